"""ML-engineering competitions in MLE-bench's layout: the tasks of the MLE domain.

A prepared competition is a directory::

    <id>/description.md            the task, as the policy reads it
    <id>/public/train.csv          mounted read-only into the sandbox (DATA_DIR)
    <id>/public/test.csv
    <id>/public/sample_submission.csv
    <id>/private/answers.csv       never mounted: grading happens on the host
    <id>/competition.json          metric, columns, and the worst/best raw scores for normalising

The offline catalog (``catalog.py``: iris, wine, breast cancer, digits, diabetes from scikit-learn's
bundled files; two seeded synthetic sets) is built deterministically and prepared with::

    python -m exitagent.competitions prepare [--root DIR] [--only ID,...]
    python -m exitagent.competitions list
    python -m exitagent.competitions calibrate      # re-derive worst/best into recorded.json

Preparing is atomic (each competition is written into a temporary directory, then renamed into
place) and idempotent (a competition whose data and record are unchanged is left alone). Worst and
best come from the reference programs of ``references.py`` and are checked in as ``recorded.json``.

A directory of a real competition prepared by MLE-bench (``<data-dir>/<id>/prepared/{public,private}``)
is accepted as well: it is graded by MLE-bench's own grader, so ``mlebench`` must be installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from exitagent.errors import ConfigError

if TYPE_CHECKING:
    from evaluators.worlds.mle.catalog import Built

# The catalog (numpy, pandas, scikit-learn) is imported where it is used: loading the domains for
# math must not pay for it.

log = structlog.get_logger(__name__)

FORMAT = 1  # of competition.json; a prepared competition of another format is rebuilt
RECORDED = Path(__file__).with_name("recorded.json")
METADATA = "competition.json"


@dataclass(frozen=True)
class Competition:
    """A prepared competition on disk. ``source`` is "offline" (ours) or "mlebench" (a real one)."""

    id: str
    root: Path
    metric: str
    lower_is_better: bool
    worst: float | None
    best: float | None
    id_column: str = "id"
    target: str = ""
    columns: tuple[str, ...] = ()  # of a valid submission, in order
    classes: tuple[str, ...] = ()  # log loss: one probability column per class
    split: str = ""
    source: str = "offline"

    @property
    def public_dir(self) -> Path:
        return self.root / "prepared" / "public" if self.source == "mlebench" else self.root / "public"

    @property
    def private_dir(self) -> Path:
        return self.root / "prepared" / "private" if self.source == "mlebench" else self.root / "private"

    @property
    def answers_path(self) -> Path:
        return self.private_dir / "answers.csv"

    def description(self) -> str:
        """The task description: ``description.md`` (MLE-bench: the registry's text, when present)."""
        for path in (self.root / "description.md", self.public_dir / "description.md"):
            if path.is_file():
                return path.read_text(encoding="utf-8")
        if self.source == "mlebench":
            from evaluators.worlds.mle.mlebench import mlebench_description

            return mlebench_description(self.root)
        return f"# {self.id}\n\nSee the data files; the submission format is that of sample_submission.csv."

    def normalise(self, raw: float) -> float:
        if self.worst is None or self.best is None:
            raise ConfigError(f"competition {self.id} has no worst/best scores recorded: run "
                              "`python -m exitagent.competitions calibrate`")
        return normalise(raw, self.worst, self.best)


def normalise(raw: float, worst: float, best: float) -> float:
    """(raw - worst) / (best - worst), clipped to [0, 1]; works for lower-is-better metrics too.

    The scale of exit-spec.md section 4, between the competition's worst and best reference values."""
    if best == worst:
        raise ValueError(f"worst and best are both {best}: the competition cannot be normalised")
    return min(1.0, max(0.0, (raw - worst) / (best - worst)))


def default_root() -> Path:
    """Where offline competitions are prepared: ``$EXITAGENT_HOME/competitions``."""
    home = Path(os.environ.get("EXITAGENT_HOME", Path.home() / ".cache" / "exitagent")).expanduser()
    return home / "competitions"


def recorded() -> dict[str, dict[str, Any]]:
    """The checked-in worst/best values and answer digests, by competition id."""
    return dict(json.loads(RECORDED.read_text(encoding="utf-8"))["competitions"])


def digest(frame_csv: str) -> str:
    return hashlib.sha256(frame_csv.encode()).hexdigest()


def load_competition(path: Path) -> Competition:
    """A prepared competition directory: ours (``competition.json``) or MLE-bench's (``prepared/``)."""
    path = Path(path)
    if (path / METADATA).is_file():
        meta = json.loads((path / METADATA).read_text(encoding="utf-8"))
        return Competition(
            id=meta["id"], root=path, metric=meta["metric"], lower_is_better=meta["lower_is_better"],
            worst=meta["worst"], best=meta["best"], id_column=meta["id_column"], target=meta["target"],
            columns=tuple(meta["columns"]), classes=tuple(meta["classes"]), split=meta.get("split", ""),
        )
    if (path / "prepared" / "public").is_dir():
        from evaluators.worlds.mle.mlebench import mlebench_fields

        return Competition(**mlebench_fields(path), root=path, source="mlebench")
    raise ConfigError(f"{path} is not a prepared competition (no {METADATA}, no MLE-bench prepared/public)")


def _metadata(competition_id: str, built: Built, record: dict[str, Any] | None) -> dict[str, Any]:
    from evaluators.worlds.mle.catalog import LOWER_IS_BETTER, SPECS

    spec = SPECS[competition_id]
    return {
        "format": FORMAT, "id": competition_id, "metric": spec.metric, "split": spec.split,
        "lower_is_better": LOWER_IS_BETTER[spec.metric], "id_column": "id", "target": built.target,
        "columns": list(built.sample_submission.columns), "classes": list(built.classes),
        "worst": record["worst"] if record else None, "best": record["best"] if record else None,
        "answers_sha256": digest(built.answers.to_csv(index=False)),
    }


def _write(directory: Path, built: Built, meta: dict[str, Any]) -> None:
    (directory / "public").mkdir()
    (directory / "private").mkdir()
    built.train.to_csv(directory / "public" / "train.csv", index=False)
    built.test.to_csv(directory / "public" / "test.csv", index=False)
    built.sample_submission.to_csv(directory / "public" / "sample_submission.csv", index=False)
    built.answers.to_csv(directory / "private" / "answers.csv", index=False)
    (directory / "description.md").write_text(built.description, encoding="utf-8")
    (directory / METADATA).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")  # last: marks it done


def _current(target: Path, meta: dict[str, Any]) -> bool:
    try:
        return bool(json.loads((target / METADATA).read_text(encoding="utf-8")) == meta)
    except (OSError, ValueError):
        return False


def prepare_one(root: Path, competition_id: str, *, record: dict[str, Any] | None = None) -> Competition:
    """Prepare one catalog competition under ``root``; a no-op when it is there and unchanged."""
    from evaluators.worlds.mle.catalog import SPECS, build

    if competition_id not in SPECS:
        raise ConfigError(f"no offline competition {competition_id!r}: choose from {', '.join(SPECS)}")
    built = build(competition_id)
    meta = _metadata(competition_id, built, record if record is not None else recorded().get(competition_id))
    target = root / competition_id
    if _current(target, meta):
        return load_competition(target)
    root.mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(prefix=f".{competition_id}.", dir=root))
    try:
        _write(fresh, built, meta)
        if target.exists():  # stale: move it aside first, so `target` is never half old, half new
            stale = Path(tempfile.mkdtemp(prefix=f".{competition_id}.stale.", dir=root))
            os.replace(target, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(fresh, target)
        except OSError:
            if not _current(target, meta):  # another preparer won the race with the same data: fine
                raise
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
    log.info("competition_prepared", id=competition_id, root=str(root))
    return load_competition(target)


def prepare(root: Path | None = None, ids: Iterable[str] | None = None) -> list[Competition]:
    """Prepare catalog competitions (all, or ``ids``) under ``root`` (default ``default_root()``)."""
    root = root or default_root()
    return [prepare_one(root, i) for i in (list(ids) if ids is not None else catalog_ids())]


def catalog_ids(split: str = "all") -> list[str]:
    """Catalog ids of a split: "train", "heldout" or "all"."""
    from evaluators.worlds.mle.catalog import CATALOG

    if split not in ("train", "heldout", "all"):
        raise ConfigError(f"offline competitions have the splits train, heldout and all, not {split!r}")
    return [s.id for s in CATALOG if split in ("all", s.split)]


__all__ = ["Competition", "catalog_ids", "default_root", "load_competition", "prepare", "prepare_one"]
