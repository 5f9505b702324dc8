"""The trainer's durable state: everything needed to continue exactly where step N left off.

``RUN/trainer/state-NNNNNN/`` holds the model as an ordinary checkpoint (the published
checkpoint ``RUN/weights/step-NNNNNN`` is made of hard links to these files), the optimizer
state, the reference policy's weights when they differ from the initial model, the RNG states
and the step. It is written to a hidden temporary directory, fsynced, renamed, then marked
``COMPLETE``; only marked directories are ever read. Only the newest is kept (1.6 GB for the
default model, most of it Adam's moments): an older one is removed only after the newer one is
marked, so a crash always leaves one complete state, and published checkpoints keep their files
through their own hard links.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from exitagent.errors import CheckpointError, ConfigError
from exitagent.serving import checkpoints

COMPLETE = "COMPLETE"
LOCK = "update.lock"
SHARDS = "shards"  # torch.distributed.checkpoint's directory in a sharded trainer's state


@contextmanager
def sole_writer(directory: Path) -> Iterator[None]:
    """Hold ``directory/update.lock`` while this process trains: a second trainer on the same run
    would save and publish the same steps. The kernel drops the lock when the holder dies, kill -9
    included, so a crash never leaves the run locked."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / LOCK).open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise ConfigError(f"another trainer (pid {handle.read().strip() or '?'}) is updating "
                              f"{directory.parent}; stop it first") from None
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield


@dataclass
class TrainerState:
    step: int
    optimizer: dict[str, Any]
    reference: dict[str, torch.Tensor] | None  # None: the reference is still the initial model
    rng: dict[str, Any]
    bad_steps: int = 0
    history: list[list[Any]] = field(default_factory=list)  # [step, group ids] per update: the lineage


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])


def save(directory: Path, state: TrainerState, model: Any, tokenizer: Any, keep: int = 1) -> Path:
    """Write ``directory/state-NNNNNN`` atomically and prune older complete states."""
    return commit(directory, state.step, lambda tmp: _write(tmp, state, model, tokenizer), keep)


def commit(directory: Path, step: int, write: Callable[[Path], None], keep: int = 1) -> Path:
    """``write(tmp)`` fills a hidden temporary directory, which then becomes ``state-NNNNNN`` and is
    marked COMPLETE; older complete states are pruned. (The sharded trainer's ``write`` is where
    every rank writes its shards.)"""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"state-{step:06d}"
    tmp = directory / f".tmp-state-{step:06d}-{os.getpid()}"
    # Leftovers of failed saves (a full disk, a kill -9) first: each is as big as a state, and the
    # sole-writer lock guarantees no other trainer is writing one now.
    for leftover in directory.glob(".tmp-state-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        tmp.mkdir()
        write(tmp)
        shutil.rmtree(final, ignore_errors=True)  # an unmarked leftover of a crash at this step
        os.rename(tmp, final)
        (final / COMPLETE).touch()
        checkpoints.fsync(final)
        checkpoints.fsync(directory)
    except Exception as error:  # OSError, or torch's and safetensors' own wrappers of a failed write
        shutil.rmtree(tmp, ignore_errors=True)
        kept = complete_states(directory)
        raise CheckpointError(f"could not save the trainer state of step {step} in {directory} "
                              f"({type(error).__name__}: {error}; disk full?). The partial state was removed; "
                              f"{kept[-1].name if kept else 'no earlier state'} is kept") from error
    for old in complete_states(directory)[:-keep]:
        shutil.rmtree(old)
    return final


def _write(tmp: Path, state: TrainerState, model: Any, tokenizer: Any) -> None:
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save({"optimizer": state.optimizer, "rng": state.rng}, tmp / "optimizer.pt")
    if state.reference is not None:
        torch.save(state.reference, tmp / "reference.pt")
    write_meta(tmp, state)


def write_meta(tmp: Path, state: TrainerState) -> None:
    """``meta.json`` (step, bad steps, lineage), then every file of ``tmp`` to disk."""
    meta = {"step": state.step, "bad_steps": state.bad_steps, "history": state.history}
    (tmp / "meta.json").write_text(json.dumps(meta))
    for path in tmp.iterdir():
        if path.is_file():
            checkpoints.fsync(path)


def read_meta(path: Path) -> TrainerState:
    """A saved state's step, bad steps and lineage (optimizer, reference and RNG left empty)."""
    meta = json.loads((path / "meta.json").read_text())
    return TrainerState(meta["step"], {}, None, {}, meta.get("bad_steps", 0), meta.get("history", []))


def complete_states(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("state-*") if (p / COMPLETE).is_file())


def load_latest(directory: Path) -> tuple[Path, TrainerState] | None:
    states = complete_states(directory)
    if not states:
        return None
    path = states[-1]
    if (path / SHARDS).is_dir():
        raise ConfigError(f"{path} was saved by a trainer under torchrun (sharded optimizer state): "
                          f"resume it with torchrun")
    meta = json.loads((path / "meta.json").read_text())
    saved = torch.load(path / "optimizer.pt", weights_only=False)
    reference = torch.load(path / "reference.pt") if (path / "reference.pt").exists() else None
    return path, TrainerState(meta["step"], saved["optimizer"], reference, saved["rng"], meta.get("bad_steps", 0),
                              meta.get("history", []))
