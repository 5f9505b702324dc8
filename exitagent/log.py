"""Logging: structlog events, pretty on a terminal, JSON lines with ``--log-json`` (or when piped).

Modules take ``log = structlog.get_logger(__name__)`` and emit snake_case past-tense events with
key-value context (``log.info("checkpoint_loaded", step=12)``). Entry points call ``configure``
once. Numeric metrics do not go here: they go to the run's ``metrics.jsonl`` (see ``MetricsFile``).

``--track wandb`` (collect and training.update; ``TrackFlags``) also sends each metrics row to an
experiment tracker, beside the JSONL file, which stays the record the run's own tools read. The
tracker is an optional extra (``pip install 'exitagent[track]'``) and offline by default: its files go
to ``RUN/tracking/`` (``wandb sync RUN/tracking/wandb/offline-run-*`` uploads them later), so a run
sends nothing over the network unless ``--track-mode online`` says so.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

import structlog

from exitagent.errors import ConfigError
from exitagent.run_dir import RunDir

TRACKERS = ("none", "wandb")
TRACK_MODES = ("offline", "online")


def configure(*, json_lines: bool | None = None, level: str = "info", stream: TextIO | None = None) -> None:
    """Set up structlog for a process. ``json_lines=None`` picks JSON when stderr is not a terminal.

    Without ``stream``, each event goes to whatever ``sys.stderr`` is when it is logged (not when
    this was called), so a replaced or captured stderr (pytest) never gets a stale handle.
    """
    if json_lines is None:
        json_lines = not (stream or sys.stderr).isatty()
    colors = not json_lines and (stream or sys.stderr).isatty()
    renderer: Any = structlog.processors.JSONRenderer() if json_lines else structlog.dev.ConsoleRenderer(colors=colors)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=(structlog.PrintLoggerFactory(stream) if stream else
                        lambda *_: structlog.PrintLogger(sys.stderr)),
        cache_logger_on_first_use=False,
    )


class Tracker(Protocol):
    """An experiment tracker that receives each metrics row's numbers (``WandbTracker``)."""

    def log(self, kind: str, values: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True, kw_only=True)
class TrackFlags:
    """The tracking flags, shared by the configs of the commands that write metrics."""

    track: str = field(default="none", metadata={
        "help": "also send metrics to an experiment tracker: none or wandb (pip install 'exitagent[track]')"})
    track_project: str = field(default="exitagent", metadata={"help": "the tracker's project"})
    track_run: str = field(default="", metadata={"help": "the tracker's run name (default: the run directory's)"})
    track_mode: str = field(default="offline", metadata={
        "help": "offline: the tracker's files under RUN/tracking, nothing sent; online: sent as the run goes"})

    def check_tracking(self) -> None:
        """Refuse an unknown tracker, or one whose package is not installed, before the run starts."""
        if self.track not in TRACKERS or self.track_mode not in TRACK_MODES:
            raise ConfigError(f"--track must be one of {', '.join(TRACKERS)} and --track-mode one of "
                              f"{', '.join(TRACK_MODES)}, not {self.track!r} / {self.track_mode!r}")
        if self.track == "wandb":
            _import_wandb()

    def open_tracker(self, run_dir: Path, command: str) -> Tracker | None:
        if self.track == "none":
            return None
        name = self.track_run or Path(run_dir).resolve().name
        settings = {k: str(v) for k, v in asdict(self).items()}  # the command's whole config
        return WandbTracker(RunDir(run_dir).tracking, project=self.track_project, group=name,
                            name=f"{name}-{command}", mode=self.track_mode, config=settings)


def _import_wandb() -> Any:
    try:
        import wandb
    except ImportError as error:
        raise ConfigError("--track wandb needs the wandb package: pip install 'exitagent[track]'") from error
    return wandb


class WandbTracker:
    """Weights & Biases: numbers only, each under ``KIND/NAME`` (``update/loss``, ``group/reward_mean``)."""

    def __init__(self, directory: Path, *, project: str, group: str, name: str, mode: str,
                 config: dict[str, Any]) -> None:
        wandb = _import_wandb()
        directory.mkdir(parents=True, exist_ok=True)
        # console="off": our stderr stays ours (one error line per failure); no system-stats sampler
        settings = wandb.Settings(console="off", silent=True, x_disable_stats=True)
        self._wandb = wandb
        self._run = wandb.init(project=project, group=group, name=name, dir=str(directory), mode=mode,
                               config=config, settings=settings)

    def log(self, kind: str, values: dict[str, Any]) -> None:
        numbers = {f"{kind}/{key}": float(value) for key, value in values.items()
                   if isinstance(value, int | float)}
        if numbers:
            self._run.log(numbers)

    def close(self) -> None:
        self._run.finish()
        self._wandb.teardown()  # finish() returns before wandb's service has written the run's file


class MetricsFile:
    """Append-only JSON-lines metrics: one object per event, flushed at once so a crash loses none.
    With a ``tracker`` each row's numbers go to it as well."""

    def __init__(self, path: Path, tracker: Tracker | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = path.open("a", encoding="utf-8")
        self._tracker = tracker

    def write(self, kind: str, **values: Any) -> None:
        self._file.write(json.dumps({"time": time.time(), "kind": kind, **values}, default=str) + "\n")
        self._file.flush()
        if self._tracker is not None:
            self._tracker.log(kind, values)

    def close(self) -> None:
        self._file.close()
        if self._tracker is not None:
            self._tracker.close()


def collector_metrics(run_dir: Path, name: str = "collect") -> Path:
    """This process's metrics file, ``RUN/metrics/NAME-HOST-PID.jsonl``: collectors on many machines
    share a run directory, and appending to one file from several hosts interleaves lines."""
    host = "".join(c if c.isalnum() or c in "-_." else "_" for c in socket.gethostname()) or "host"
    return RunDir(run_dir).metrics_file(f"{name}-{host}-{os.getpid()}")


def read_metrics(run_dir: Path, name: str = "collect", kind: str | None = None) -> list[dict[str, Any]]:
    """Every collector's rows (``NAME.jsonl`` of earlier versions and each ``NAME-HOST-PID.jsonl``),
    merged in time order, each with its file's stem as ``source``; ``kind`` keeps one kind of row.
    A torn last line (a writer killed
    mid-line) is skipped."""
    folder = RunDir(run_dir).metrics
    paths = [folder / f"{name}.jsonl", *sorted(folder.glob(f"{name}-*.jsonl"))] if folder.is_dir() else []
    rows = []
    for path in paths:
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and (kind is None or row.get("kind") == kind):
                rows.append({**row, "source": path.stem})  # which collector wrote it
    return sorted(rows, key=lambda row: float(row.get("time", 0.0)))
