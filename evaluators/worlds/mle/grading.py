"""Grading a submission of an offline competition, the way MLE-bench's graders do.

``grade(competition, submission, answers)`` returns the raw metric value or raises
``InvalidSubmission`` with a reason a person (and the policy's metrics) can read: wrong or missing
columns, the wrong number of rows, ids that are not the test ids, duplicates, missing or
non-numeric values. Mapping a raw value onto [0, 1] is ``Competition.normalise`` (the package).

The submission is model-written, so parsing it can take any amount of memory (millions of columns,
one giant field). ``evaluators.mle`` therefore grades in a child process under a memory cgroup and
a wall clock, through this module's entry point, which prints one JSON verdict::

    python -m evaluators.worlds.mle.grading COMPETITION_DIR SUBMISSION_CSV
    {"raw": 0.93, "reason": ""}          graded
    {"raw": null, "reason": "..."}       invalid submission, with why
    {"error": "..."}                     the grader itself failed (exit status 2)
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from evaluators.worlds.mle import Competition

LOG_LOSS_EPS = 1e-15  # Kaggle's clipping: a confident wrong answer costs ~34.5, not infinity


class InvalidSubmission(ValueError):
    """The submission cannot be graded; the message says why."""


def _check_frame(submission: pd.DataFrame, answers: pd.DataFrame, id_column: str, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in submission.columns]
    extra = [c for c in submission.columns if c not in columns]
    if missing or extra:
        raise InvalidSubmission(f"expected the columns {list(columns)}; missing {missing}, unexpected {extra}")
    if len(submission) != len(answers):
        raise InvalidSubmission(f"expected {len(answers)} rows (one per test row), got {len(submission)}")
    ids = submission[id_column]
    if ids.isna().any():
        raise InvalidSubmission(f"the {id_column} column has missing values")
    if ids.duplicated().any():
        raise InvalidSubmission(f"{int(ids.duplicated().sum())} duplicated {id_column} values")
    unknown = set(ids.astype(str)) - set(answers[id_column].astype(str))
    if unknown:
        raise InvalidSubmission(f"{len(unknown)} {id_column} values are not test ids, e.g. {sorted(unknown)[0]!r}")


def _numeric(frame: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
    values = frame[list(columns)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype="float64")
    bad = ~np.isfinite(values)
    if bad.any():
        column = list(columns)[int(np.argwhere(bad)[0][1])]
        raise InvalidSubmission(f"{int(bad.sum())} missing, non-numeric or infinite predictions (e.g. in {column!r})")
    return values


def _labels(values: pd.Series) -> list[str]:
    """Labels as comparable text: 3, 3.0 and "3" are the same class."""
    def one(value: object) -> str:
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        return str(value).strip()

    return [one(v) for v in values]


def grade(competition: Competition, submission: pd.DataFrame, answers: pd.DataFrame) -> float:
    """The raw metric of ``submission`` against ``answers`` (both with the competition's id column)."""
    from sklearn.metrics import log_loss, mean_squared_error, roc_auc_score

    id_column, target = competition.id_column, competition.target
    _check_frame(submission, answers, id_column, competition.columns)
    merged = answers.astype({id_column: str}).merge(submission.astype({id_column: str}), on=id_column,
                                                    suffixes=("_true", ""))
    truth = merged[f"{target}_true"] if target in submission.columns else merged[target]
    metric = competition.metric
    if metric == "accuracy":
        if merged[target].isna().any():
            raise InvalidSubmission(f"{int(merged[target].isna().sum())} missing predictions in {target!r}")
        predicted, actual = _labels(merged[target]), _labels(truth)
        return float(np.mean([p == a for p, a in zip(predicted, actual, strict=True)]))
    if metric == "auc":
        scores = _numeric(merged, [target])[:, 0]
        return float(roc_auc_score(truth.to_numpy(), scores))
    if metric == "rmse":
        predicted_values = _numeric(merged, [target])[:, 0]
        return float(math.sqrt(mean_squared_error(truth.to_numpy(dtype="float64"), predicted_values)))
    if metric == "log_loss":
        probabilities = _numeric(merged, competition.classes)
        if (probabilities < 0).any():
            raise InvalidSubmission("probabilities must not be negative")
        probabilities = np.clip(probabilities, LOG_LOSS_EPS, 1 - LOG_LOSS_EPS)
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        return float(log_loss(truth.astype(str), probabilities, labels=list(competition.classes)))
    raise ValueError(f"unknown metric {metric!r}")


def grade_file(competition_dir: Path, submission: Path) -> dict[str, Any]:
    """The verdict on the submission file, as the entry point prints it."""
    from evaluators.worlds.mle import load_competition

    competition = load_competition(competition_dir)
    try:
        frame = pd.read_csv(submission)
    except (ValueError, UnicodeDecodeError) as error:  # pandas' parser errors are ValueErrors
        return {"raw": None, "reason": f"submission.csv is not a readable CSV: {str(error)[:200]}"}
    try:
        if competition.source == "mlebench":
            from evaluators.worlds.mle.mlebench import grade_mlebench

            raw = grade_mlebench(competition, frame)
            return {"raw": raw, "reason": "" if raw is not None else "MLE-bench's grader rejected the submission"}
        return {"raw": grade(competition, frame, pd.read_csv(competition.answers_path)), "reason": ""}
    except InvalidSubmission as error:
        return {"raw": None, "reason": str(error)}


def main(argv: Sequence[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m evaluators.worlds.mle.grading COMPETITION_DIR SUBMISSION_CSV", file=sys.stderr)
        return 2
    try:
        verdict = grade_file(Path(argv[0]), Path(argv[1]))
    except MemoryError:  # without a memory cgroup the parent's RLIMIT_DATA lands here
        verdict = {"raw": None, "reason": "submission.csv needs more memory to parse than grading may use"}
    except Exception as error:  # any failure of the grader: the parent raises one EvaluatorError
        print(json.dumps({"error": f"{type(error).__name__}: {str(error)[:500]}"}))
        return 2
    print(json.dumps(verdict))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
