"""A cache of evaluation results shared by runs, keyed by everything that determines the result.

The main job measures its base policy before training; a second run with the same base weights
and the same evaluation flags would measure exactly the same thing again (minutes on a CPU).
``EvalCache.load(inputs)`` returns a stored result whose inputs equal ``inputs``, and
``EvalCache.store(inputs, result)`` keeps one. The caller decides what the inputs are
(``exitagent.run_eval.base_cache_inputs``): they must name every flag and every piece of code or
data the result depends on.

An entry is ``DIR/KEY.json`` with ``KEY`` = the sha256 of the canonical JSON of the inputs, and
holds the inputs themselves beside the result, so a reader checks both the key and the inputs
(a hash collision or a hand-edited file cannot pass for a match). Files are written completely,
then renamed into place. An entry that is unreadable, malformed or does not match is ignored with
one log line and measured again; the new measurement replaces it.

``DIR``: ``$EXITAGENT_EVAL_CACHE``, else ``$EXITAGENT_HOME/evaluations`` (``~/.cache/exitagent/``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

SCHEMA = "exitagent.eval_cache/1"
ENV = "EXITAGENT_EVAL_CACHE"


def default_dir() -> Path:
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    return Path(os.environ.get("EXITAGENT_HOME", Path.home() / ".cache" / "exitagent")).expanduser() / "evaluations"


def key_of(inputs: dict[str, Any]) -> str:
    """The sha256 of ``inputs`` as canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _canonical(inputs: dict[str, Any]) -> Any:
    """``inputs`` as read back from JSON (tuples become lists), so a stored copy compares equal."""
    return json.loads(json.dumps(inputs, sort_keys=True))


class EvalCache:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, inputs: dict[str, Any]) -> Path:
        return self.directory / f"{key_of(inputs)}.json"

    def load(self, inputs: dict[str, Any]) -> dict[str, Any] | None:
        """The stored result measured with exactly ``inputs``; None when there is none (or it is bad)."""
        path = self.path(inputs)
        if not path.exists():
            return None
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as error:
            entry, reason = None, f"unreadable ({type(error).__name__})"
        else:
            reason = _mismatch(entry, path.stem, inputs)
        if reason:
            log.warning("cached_evaluation_ignored", path=str(path), reason=reason, then="measured again")
            return None
        return dict(entry["result"])

    def store(self, inputs: dict[str, Any], result: dict[str, Any], attachment: Path | None = None) -> Path | None:
        """Keep ``result`` (and a copy of ``attachment``, e.g. its plot, as ``KEY`` + its suffix); the
        JSON appears last and complete, so a reader never sees half an entry. A cache that cannot be
        written (read-only, a file in the way) costs only the reuse: one log line, None."""
        path = self.path(inputs)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            if attachment is not None and attachment.exists():
                tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{attachment.suffix}")
                shutil.copyfile(attachment, tmp)
                os.replace(tmp, path.with_suffix(attachment.suffix))
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # two runs may store the same key at once
            entry = {"schema": SCHEMA, "key": path.stem, "inputs": _canonical(inputs), "result": result}
            tmp.write_text(json.dumps(entry, indent=1) + "\n", encoding="utf-8")
            os.replace(tmp, path)
        except OSError as error:
            log.warning("evaluation_not_cached", path=str(path), error=f"{type(error).__name__}: {error}")
            return None
        log.info("evaluation_cached", path=str(path))
        return path


def _mismatch(entry: Any, key: str, inputs: dict[str, Any]) -> str:
    """Why ``entry`` (read from ``KEY.json``) is not a result measured with ``inputs``; "" when it is."""
    if not isinstance(entry, dict) or entry.get("schema") != SCHEMA or not isinstance(entry.get("result"), dict):
        return "not a cache entry"
    if entry.get("key") != key or entry.get("inputs") != _canonical(inputs) or key_of(entry["inputs"]) != key:
        return "its inputs do not match its key"
    return ""
