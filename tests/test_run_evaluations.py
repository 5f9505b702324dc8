"""exitagent.run on resume: a saved evaluation is reused only when it measured the policy now
served with the same flags; a base evaluation that no longer fits is an error, not a silent
re-measurement of the trained weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exitagent import run, run_eval
from exitagent.errors import ExitAgentError


def saved(cfg: run.RunConfig, name: str, policy: str) -> Path:
    path = cfg.run_dir / "eval" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"accuracy_by_step": [0.5, 0.5], "measured": run_eval.evaluation_key(cfg, policy)}))
    return path


def test_an_evaluation_of_the_served_policy_with_the_same_flags_is_reused(tmp_path: Path) -> None:
    cfg = run.parse_config(["--run-dir", str(tmp_path)])
    saved(cfg, "base", run_eval.BASE_POLICY)
    saved(cfg, "trained", "step-000007")
    assert run_eval.saved_evaluation(cfg, "base", run_eval.BASE_POLICY) is not None
    assert run_eval.saved_evaluation(cfg, "trained", "step-000007") is not None


def test_a_trained_evaluation_of_older_weights_is_measured_again(tmp_path: Path) -> None:
    cfg = run.parse_config(["--run-dir", str(tmp_path)])
    saved(cfg, "trained", "step-000007")
    assert run_eval.saved_evaluation(cfg, "trained", "step-000012") is None
    assert run_eval.saved_evaluation(run.parse_config(["--run-dir", str(tmp_path), "--eval-steps", "2"]), "trained",
                                "step-000007") is None  # other flags: measured again too
    assert run_eval.saved_evaluation(cfg, "base", run_eval.BASE_POLICY) is None  # never measured


def test_a_base_evaluation_with_other_flags_before_training_is_measured_again(tmp_path: Path) -> None:
    saved(run.parse_config(["--run-dir", str(tmp_path)]), "base", run_eval.BASE_POLICY)
    other = run.parse_config(["--run-dir", str(tmp_path), "--max-tokens", "32"])
    assert run_eval.saved_evaluation(other, "base", run_eval.BASE_POLICY) is None


def test_a_base_evaluation_with_other_flags_after_training_is_a_clear_error_and_kept(tmp_path: Path) -> None:
    cfg = run.parse_config(["--run-dir", str(tmp_path)])
    path = saved(cfg, "base", run_eval.BASE_POLICY)
    before = path.read_text()
    other = run.parse_config(["--run-dir", str(tmp_path), "--eval-tasks", "50"])
    with pytest.raises(ExitAgentError, match="new --run-dir"):
        run_eval.saved_evaluation(other, "base", "step-000012")
    assert path.read_text() == before


def test_the_training_clock_survives_a_restart(tmp_path: Path) -> None:
    assert run.trained_seconds(tmp_path) == 0.0
    run._record_training(tmp_path, 61.25)
    assert run.trained_seconds(tmp_path) == pytest.approx(61.2, abs=0.06)
    assert [p.name for p in tmp_path.iterdir()] == [run.TRAIN_CLOCK]


# --- the base evaluation, shared between runs through the cache (exitagent.eval_cache) ---------------


class Served:
    """What run_eval asks a server: its version and base model (GET /policy), and its URL."""

    def __init__(self, version: str = run_eval.BASE_POLICY, fingerprint: str = "f00d") -> None:
        self.base_url = "http://127.0.0.1:1/v1"
        self.answer = {"version": version, "base": {"name": "smollm2-135m", "fingerprint": fingerprint}}

    def policy(self, timeout_s: float = 10.0) -> dict[str, object]:
        return self.answer


class FakeEvaluate:
    """Stands in for the ``exitagent.evaluate`` child: writes a result and its plot, counts its calls."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, cfg: run.RunConfig, servers: object, args: list[str], out: Path) -> None:
        self.calls.append(args)
        out.write_text(json.dumps({"accuracy_by_step": [0.25, 0.5], "elapsed_s": 90.0, "call": len(self.calls)}))
        out.with_suffix(".png").write_bytes(b"\x89PNG fake")


def base_of(run_dir: Path, flags: list[str], measure: FakeEvaluate, server: Served | None = None) -> dict[str, object]:
    cfg = run.parse_config(["--run-dir", str(run_dir), "--precision", "float32", *flags])
    return run_eval.evaluate(cfg, [server or Served()], "base", measure=measure)  # type: ignore[list-item]


def test_a_second_run_with_the_same_base_and_flags_reuses_the_base_evaluation(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    measure = FakeEvaluate()
    first = base_of(tmp_path / "one", [], measure)
    second = base_of(tmp_path / "two", [], measure)
    assert len(measure.calls) == 1
    assert "base evaluation reused from" in capsys.readouterr().out
    assert second["accuracy_by_step"] == first["accuracy_by_step"] and second["call"] == 1
    assert second["measured"] == first["measured"] and str(second["reused_from"]).startswith(str(tmp_path))
    kept = json.loads((tmp_path / "two" / "eval" / "base.json").read_text())
    assert kept == second and (tmp_path / "two" / "eval" / "base.png").read_bytes() == b"\x89PNG fake"
    assert sorted(p.name for p in (tmp_path / "two" / "eval").iterdir()) == ["base.json", "base.png"]  # no leftovers


def test_other_flags_other_weights_or_a_trained_policy_are_measured(tmp_path: Path) -> None:
    measure = FakeEvaluate()
    base_of(tmp_path / "one", [], measure)
    base_of(tmp_path / "steps", ["--eval-steps", "2"], measure)
    base_of(tmp_path / "tokens", ["--max-tokens", "32"], measure)
    base_of(tmp_path / "weights", [], measure, Served(fingerprint="beef"))
    assert len(measure.calls) == 4
    cfg = run.parse_config(["--run-dir", str(tmp_path / "trained"), "--precision", "float32"])
    run_eval.evaluate(cfg, [Served("step-000004")], "trained", measure=measure)  # type: ignore[list-item]
    run_eval.evaluate(cfg, [Served("step-000004")], "trained", measure=measure)  # type: ignore[list-item]
    assert len(measure.calls) == 5  # the second was the run's own saved evaluation: never the cache
    assert len(list((tmp_path / "eval-cache").glob("*.json"))) == 4  # trained evaluations are not cached


@pytest.mark.parametrize("damage", ["garbage", "other inputs", "no result"])
def test_a_corrupt_or_mismatching_entry_is_ignored_with_one_line_and_measured_again(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str) -> None:
    from exitagent.log import configure

    configure(level="info")
    measure = FakeEvaluate()
    base_of(tmp_path / "one", [], measure)
    [entry] = (tmp_path / "eval-cache").glob("*.json")
    stored = json.loads(entry.read_text())
    if damage == "garbage":
        entry.write_bytes(b"\x00{not json")
    elif damage == "other inputs":
        stored["inputs"]["settings"]["steps"] = 99
        entry.write_text(json.dumps(stored))
    else:
        del stored["result"]
        entry.write_text(json.dumps(stored))
    capsys.readouterr()
    again = base_of(tmp_path / "two", [], measure)
    assert len(measure.calls) == 2 and again["call"] == 2 and "reused_from" not in again
    err = [line for line in capsys.readouterr().err.splitlines() if "cached_evaluation_ignored" in line]
    assert len(err) == 1 and str(entry) in err[0]
    assert json.loads(entry.read_text())["result"]["call"] == 2  # replaced by the new measurement
    base_of(tmp_path / "three", [], measure)
    assert len(measure.calls) == 2


def test_the_cache_can_be_moved_or_turned_off(tmp_path: Path) -> None:
    measure = FakeEvaluate()
    base_of(tmp_path / "one", ["--eval-cache", str(tmp_path / "mine")], measure)
    base_of(tmp_path / "two", ["--eval-cache", str(tmp_path / "mine")], measure)
    assert len(measure.calls) == 1 and len(list((tmp_path / "mine").glob("*.json"))) == 1
    base_of(tmp_path / "three", ["--eval-cache", "off"], measure)
    base_of(tmp_path / "four", ["--eval-cache", "off"], measure)
    assert len(measure.calls) == 3 and not (tmp_path / "eval-cache").exists()


def test_the_cache_key_covers_the_tasks_and_every_evaluate_setting(tmp_path: Path) -> None:
    cfg = run.parse_config(["--run-dir", str(tmp_path), "--precision", "float32"])
    model = {"name": "smollm2-135m", "fingerprint": "f00d"}
    inputs = run_eval.base_cache_inputs(cfg, model, run_eval.evaluate_args(cfg))
    assert inputs["settings"]["top_p"] == 1.0 and inputs["settings"]["max_context"] == 2048  # evaluate's defaults
    assert "concurrency" not in inputs["settings"] and "out" not in inputs["settings"]
    other_seed = run.parse_config(["--run-dir", str(tmp_path), "--precision", "float32", "--seed", "1"])
    other = run_eval.base_cache_inputs(other_seed, model, run_eval.evaluate_args(other_seed))
    assert other["tasks"] != inputs["tasks"]


def test_the_word_problems_are_a_second_held_out_evaluation_of_the_run(tmp_path: Path) -> None:
    cfg = run.parse_config(["--run-dir", str(tmp_path), "--precision", "float32", "--eval-wordproblems"])
    args = run_eval.evaluate_args(cfg, "wordproblems")
    assert args[args.index("--source") + 1] == "wordproblems" and "--levels" not in args
    assert args[args.index("--max-tokens") + 1] == str(run_eval.WORD_PROBLEM_TOKENS)  # room for the longer answers
    assert run_eval.evaluate_args(cfg)[run_eval.evaluate_args(cfg).index("--max-tokens") + 1] == "64"
    measure = FakeEvaluate()
    run_eval.evaluate(cfg, [Served()], "base", "wordproblems", measure=measure)  # type: ignore[list-item]
    assert (tmp_path / "eval" / "base-wordproblems.json").exists() and len(measure.calls) == 1
    assert run_eval.saved_evaluation(cfg, "base", run_eval.BASE_POLICY) is None  # not the arithmetic one
    inputs = run_eval.base_cache_inputs(cfg, {}, args)
    assert inputs["settings"]["source"] == "wordproblems" and inputs["settings"]["n_tasks"] == 100


def test_a_base_evaluation_missing_after_training_comes_from_the_cache_or_is_a_clear_error(tmp_path: Path) -> None:
    measure = FakeEvaluate()
    cfg = run.parse_config(["--run-dir", str(tmp_path / "run"), "--precision", "float32", "--eval-wordproblems"])
    trained = [Served("step-000009")]
    with pytest.raises(ExitAgentError, match="cannot be measured here"):  # never the trained weights as "base"
        run_eval.evaluate(cfg, trained, "base", "wordproblems", measure=measure)  # type: ignore[arg-type]
    other = run.parse_config(["--run-dir", str(tmp_path / "other"), "--precision", "float32"])
    run_eval.evaluate(other, [Served()], "base", "wordproblems", measure=measure)  # type: ignore[list-item]
    reused = run_eval.evaluate(cfg, trained, "base", "wordproblems", measure=measure)  # type: ignore[arg-type]
    assert len(measure.calls) == 1 and reused["measured"] == run_eval.evaluation_key(cfg, "base", "wordproblems")
    again = run_eval.evaluate(cfg, trained, "base", "wordproblems", measure=measure)  # type: ignore[arg-type]
    assert again == reused and len(measure.calls) == 1  # the run's own copy, on the next resume


def test_a_cache_that_cannot_be_written_costs_only_the_reuse(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("in the way")
    measure = FakeEvaluate()
    first = base_of(tmp_path / "one", ["--eval-cache", str(tmp_path / "a-file")], measure)
    assert first["call"] == 1 and (tmp_path / "one" / "eval" / "base.json").exists()  # the measurement is kept
    base_of(tmp_path / "two", ["--eval-cache", str(tmp_path / "a-file")], measure)
    assert len(measure.calls) == 2
