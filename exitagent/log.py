"""Logging: structlog events, pretty on a terminal, JSON lines with ``--log-json`` (or when piped).

Modules take ``log = structlog.get_logger(__name__)`` and emit snake_case past-tense events with
key-value context (``log.info("checkpoint_loaded", step=12)``). Entry points call ``configure``
once. Numeric metrics do not go here: they go to the run's ``metrics.jsonl`` (see ``MetricsFile``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import structlog

from exitagent.run_dir import RunDir


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


class MetricsFile:
    """Append-only JSON-lines metrics: one object per event, flushed at once so a crash loses none."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = path.open("a", encoding="utf-8")

    def write(self, kind: str, **values: Any) -> None:
        self._file.write(json.dumps({"time": time.time(), "kind": kind, **values}, default=str) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


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
