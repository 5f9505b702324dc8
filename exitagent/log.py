"""Logging: structlog events, pretty on a terminal, JSON lines with ``--log-json`` (or when piped).

Modules take ``log = structlog.get_logger(__name__)`` and emit snake_case past-tense events with
key-value context (``log.info("checkpoint_loaded", step=12)``). Entry points call ``configure``
once. Numeric metrics do not go here: they go to the run's ``metrics.jsonl`` (see ``MetricsFile``).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import structlog


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
