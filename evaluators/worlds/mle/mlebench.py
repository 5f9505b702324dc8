"""Real MLE-bench competitions prepared by ``mlebench prepare``, graded by MLE-bench's own grader.

A directory ``<data-dir>/<competition-id>`` holding ``prepared/public`` and ``prepared/private`` is
read through MLE-bench's registry (``registry.set_data_dir(<data-dir>).get_competition(<id>)``), so
the answers file, the grading function and the leaderboard are MLE-bench's. Normalising needs a
worst and a best raw score: they come from the competition's leaderboard (its lowest and highest
entries in the metric's own direction) unless ``<id>/exitagent.json`` gives ``{"worst": .., "best": ..}``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exitagent.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd

    from evaluators.worlds.mle import Competition

OVERRIDES = "exitagent.json"


def _registry_competition(path: Path) -> Any:
    try:
        from mlebench.registry import registry
    except ImportError as error:
        raise ConfigError(
            f"{path} is an MLE-bench competition; grading it needs MLE-bench's own grader: install it with "
            "`pip install git+https://github.com/openai/mle-bench` (it is not on PyPI)"
        ) from error
    try:
        return registry.set_data_dir(path.parent).get_competition(path.name)
    except Exception as error:  # mlebench raises plain exceptions for an unknown id or a bad config
        raise ConfigError(f"MLE-bench does not know the competition {path.name!r}: {error}") from error


def mlebench_fields(path: Path) -> dict[str, Any]:
    """The fields of the MLE-bench competition prepared at ``path`` (named by its directory), for
    the package's ``Competition`` (built there, so this module needs the class only for types)."""
    competition = _registry_competition(path)
    worst, best, lower = _bounds(path, competition)
    columns = tuple(_read_csv(competition.sample_submission).columns)
    return {"id": competition.id, "metric": "mlebench", "lower_is_better": lower, "worst": worst, "best": best,
            "id_column": columns[0] if columns else "id", "columns": columns}


def mlebench_description(path: Path) -> str:
    """The competition's description as MLE-bench's registry holds it."""
    return str(_registry_competition(path).description)


def _bounds(path: Path, competition: Any) -> tuple[float, float, bool]:
    from mlebench.data import get_leaderboard

    leaderboard = get_leaderboard(competition)
    lower = bool(competition.grader.is_lower_better(leaderboard))
    overrides = path / OVERRIDES
    if overrides.is_file():
        values = json.loads(overrides.read_text(encoding="utf-8"))
        return float(values["worst"]), float(values["best"]), lower
    scores = leaderboard["score"].astype(float)
    worst, best = (scores.max(), scores.min()) if lower else (scores.min(), scores.max())
    return float(worst), float(best), lower


def _read_csv(path: Path) -> pd.DataFrame:
    import pandas as pd

    return pd.read_csv(path)


def grade_mlebench(competition: Competition, submission: pd.DataFrame) -> float | None:
    """MLE-bench's score of ``submission`` (None: its grader found the submission invalid)."""
    from mlebench.utils import load_answers

    registered = _registry_competition(competition.root)
    score = registered.grader(submission, load_answers(registered.answers))
    return None if score is None else float(score)
