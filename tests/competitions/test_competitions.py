"""The offline competitions: layout, atomic and idempotent preparation, the grader's rules, and the
recorded worst/best values re-derived by running the reference programs in the real sandbox."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from evaluators.mle import MLEEvaluator
from evaluators.worlds.mle import (
    Competition,
    catalog_ids,
    digest,
    load_competition,
    normalise,
    prepare,
    prepare_one,
    recorded,
)
from evaluators.worlds.mle.catalog import LOWER_IS_BETTER, METRICS, SPECS, build
from evaluators.worlds.mle.grading import InvalidSubmission, grade
from evaluators.worlds.mle.references import baseline_program, strong_program
from exitagent.competitions import main as competitions_main
from exitagent.errors import ConfigError
from tests.sandboxing import needs_bwrap


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("competitions")
    prepare(path)
    return path


def test_catalog_covers_the_metrics_and_both_splits() -> None:
    assert len(SPECS) >= 6
    assert {s.metric for s in SPECS.values()} == set(METRICS)
    assert catalog_ids("train") and catalog_ids("heldout")
    assert sorted(catalog_ids("train") + catalog_ids("heldout")) == sorted(catalog_ids("all"))
    with pytest.raises(ConfigError, match="splits"):
        catalog_ids("dev")


@pytest.mark.parametrize("competition_id", list(SPECS))
def test_prepared_layout(root: Path, competition_id: str) -> None:
    directory = root / competition_id
    for name in ("description.md", "competition.json", "public/train.csv", "public/test.csv",
                 "public/sample_submission.csv", "private/answers.csv"):
        assert (directory / name).is_file(), name
    competition = load_competition(directory)
    train = pd.read_csv(directory / "public/train.csv")
    test = pd.read_csv(directory / "public/test.csv")
    answers = pd.read_csv(directory / "private/answers.csv")
    sample = pd.read_csv(directory / "public/sample_submission.csv")
    assert competition.target in train.columns and competition.target not in test.columns
    assert list(answers["id"]) == list(test["id"]) == list(sample["id"])
    assert not set(train["id"]) & set(test["id"])
    assert len(train) + len(test) <= 5000  # sized for two cores
    assert list(sample.columns) == list(competition.columns)
    assert competition.lower_is_better == LOWER_IS_BETTER[competition.metric]
    # the sample submission is valid: it grades without complaint
    grade(competition, sample, answers)
    description = competition.description()
    assert competition.target in description and "submission" in description.lower()


def test_builds_match_the_record() -> None:
    """The data the worst/best values were measured on is the data built now (deterministic builds)."""
    record = recorded()
    assert set(record) == set(SPECS)
    for competition_id, values in record.items():
        assert values["metric"] == SPECS[competition_id].metric
        assert values["answers_sha256"] == digest(build(competition_id).answers.to_csv(index=False)), competition_id
        assert values["worst"] != values["best"]


def test_prepare_is_idempotent_and_atomic(tmp_path: Path) -> None:
    first = prepare_one(tmp_path, "iris-species")
    stamp = {p: p.stat().st_mtime_ns for p in first.root.rglob("*")}
    again = prepare_one(tmp_path, "iris-species")
    assert again == first
    assert {p: p.stat().st_mtime_ns for p in again.root.rglob("*")} == stamp  # nothing rewritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iris-species"]  # no temporary directories left

    # A stale competition (an older record) is replaced as a whole.
    meta_path = first.root / "competition.json"
    meta = json.loads(meta_path.read_text())
    meta["best"] = 0.5
    meta_path.write_text(json.dumps(meta))
    (first.root / "public" / "leftover.txt").write_text("from the old build")
    fresh = prepare_one(tmp_path, "iris-species")
    assert fresh.best == recorded()["iris-species"]["best"]
    assert not (fresh.root / "public" / "leftover.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iris-species"]


def test_cli_prepare_and_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert competitions_main(["prepare", "--root", str(tmp_path), "--only", "wine-cultivar,friedman-regression"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["friedman-regression", "wine-cultivar"]
    assert competitions_main(["list"]) == 0
    assert "breast-cancer-diagnosis" in capsys.readouterr().out


def test_unknown_competition_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no offline competition"):
        prepare_one(tmp_path, "titanic")
    with pytest.raises(ConfigError, match="not a prepared competition"):
        load_competition(tmp_path)


def test_mlebench_directory_needs_mlebench(tmp_path: Path) -> None:
    try:
        import mlebench  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("mlebench is installed here: the missing-package message cannot be shown")
    (tmp_path / "spooky-author-identification" / "prepared" / "public").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"MLE-bench's own grader.*pip install"):
        load_competition(tmp_path / "spooky-author-identification")


# --- the grader ----------------------------------------------------------------------------------


def _submission(root: Path, competition_id: str) -> tuple[Competition, pd.DataFrame, pd.DataFrame]:
    competition = load_competition(root / competition_id)
    answers = pd.read_csv(competition.answers_path)
    return competition, pd.read_csv(competition.public_dir / "sample_submission.csv"), answers


def test_grader_rejects_malformed_submissions(root: Path) -> None:
    competition, sample, answers = _submission(root, "diabetes-progression")
    cases = {
        "columns": sample.rename(columns={"progression": "prediction"}),
        "rows": sample.iloc[:-3],
        "missing": sample.assign(progression=[math.nan] + [1.0] * (len(sample) - 1)),
        "non-numeric": sample.assign(progression="high"),
        "duplicated": sample.assign(id=[sample["id"][0]] * len(sample)),
        "not test ids": sample.assign(id=sample["id"] + 100000),
    }
    reasons = {}
    for name, frame in cases.items():
        with pytest.raises(InvalidSubmission) as error:
            grade(competition, frame, answers)
        reasons[name] = str(error.value)
    assert "expected the columns" in reasons["columns"] and "prediction" in reasons["columns"]
    assert f"expected {len(answers)} rows" in reasons["rows"]
    assert "missing, non-numeric" in reasons["missing"] and "missing, non-numeric" in reasons["non-numeric"]
    assert "duplicated" in reasons["duplicated"]
    assert "not test ids" in reasons["not test ids"]


def test_grader_values(root: Path) -> None:
    competition, sample, answers = _submission(root, "iris-species")
    perfect = answers.copy()
    assert grade(competition, perfect, answers) == 1.0
    shuffled = perfect.sample(frac=1.0, random_state=0)  # row order does not matter: ids do
    assert grade(competition, shuffled, answers) == 1.0

    competition, sample, answers = _submission(root, "digits-recognition")
    as_float = answers.assign(label=answers["label"].astype(float))  # 3.0 is the label 3
    assert grade(competition, as_float, answers) == 1.0

    competition, sample, answers = _submission(root, "wine-cultivar")
    uniform = grade(competition, sample, answers)
    assert uniform == pytest.approx(math.log(3))
    doubled = sample.assign(**{c: sample[c] * 2 for c in ("class_0", "class_1", "class_2")})
    assert grade(competition, doubled, answers) == pytest.approx(uniform)  # rows are rescaled to sum 1
    with pytest.raises(InvalidSubmission, match="negative"):
        grade(competition, sample.assign(class_0=-0.1), answers)

    competition, sample, answers = _submission(root, "breast-cancer-diagnosis")
    assert grade(competition, answers.assign(malignant=answers["malignant"] * 0.9), answers) == 1.0


def test_normalise_both_directions() -> None:
    assert normalise(0.5, worst=0.5, best=1.0) == 0.0
    assert normalise(0.75, worst=0.5, best=1.0) == 0.5
    assert normalise(1.2, worst=0.5, best=1.0) == 1.0
    assert normalise(0.2, worst=0.5, best=1.0) == 0.0
    assert normalise(60.0, worst=80.0, best=40.0) == 0.5  # RMSE: lower is better
    assert normalise(90.0, worst=80.0, best=40.0) == 0.0
    with pytest.raises(ValueError, match="cannot be normalised"):
        normalise(1.0, worst=1.0, best=1.0)


# --- the record, re-derived in the real sandbox ----------------------------------------------------


@needs_bwrap
@pytest.mark.anyio
@pytest.mark.parametrize("competition_id", list(SPECS))
async def test_reference_programs_score_as_recorded(root: Path, competition_id: str) -> None:
    competition = load_competition(root / competition_id)
    values = recorded()[competition_id]
    async with MLEEvaluator(time_limit_s=60.0) as evaluator:
        worst = await evaluator.score_program(competition, baseline_program(competition_id))
        best = await evaluator.score_program(competition, strong_program(competition_id))
    assert worst.components["valid_submission"] == 1.0 and best.components["valid_submission"] == 1.0
    assert worst.components["raw"] == pytest.approx(values["worst"], abs=1e-5)
    assert best.components["raw"] == pytest.approx(values["best"], abs=1e-5)
    assert worst.total == pytest.approx(0.0, abs=1e-4)
    assert best.total == pytest.approx(1.0, abs=1e-4)
