"""The checkpoint format shared by the trainer (which publishes) and the server (which reloads).

A published checkpoint is a directory ``WEIGHTS/step-NNNNNN`` holding an ordinary Hugging Face
checkpoint (``config.json``, ``*.safetensors``, tokenizer files), a ``manifest.json`` with the size
and sha256 of every file, a ``canary.json`` (prompt token ids and the log-probabilities the trainer
computed for them, which the server compares against what it serves), and last a ``READY`` marker.

Publishing is write-then-mark: everything goes into a hidden temporary directory, each file is
fsynced, the directory is renamed into place, and only then is ``READY`` created. A reader only
ever looks at directories with ``READY``, and still verifies the manifest before trusting them:
a corrupt checkpoint must never reach vLLM, because a failed in-place reload kills its engine.

Standard library only: the server side must not need torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exitagent.errors import CheckpointError
from exitagent.faults import crash_point

READY = "READY"
MANIFEST = "manifest.json"
CANARY = "canary.json"
SERVED = "SERVED.json"  # written by the server into the weights directory: what it serves now
STEP_DIR = re.compile(r"step-(\d{6,})")


@dataclass(frozen=True)
class Canary:
    """What the served model must say about a fixed prompt: per-token log-probabilities of
    ``token_ids[1:]`` (the first token has none), and how far the server may deviate on average."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    tolerance: float = 0.1  # informative only: the server judges with its own (serve --canary-tolerance)

    def to_json(self) -> str:
        return json.dumps({"token_ids": list(self.token_ids), "logprobs": list(self.logprobs),
                           "tolerance": self.tolerance})

    @classmethod
    def read(cls, directory: Path) -> Canary:
        try:
            data = json.loads((directory / CANARY).read_text())
            return cls(tuple(data["token_ids"]), tuple(data["logprobs"]), float(data["tolerance"]))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"{directory}: unreadable {CANARY}: {error}") from error

    def distance(self, served: list[float]) -> float:
        """Mean absolute difference between these log-probabilities and the served ones."""
        if len(served) != len(self.logprobs):
            raise CheckpointError(f"canary length mismatch: served {len(served)}, expected {len(self.logprobs)}")
        return sum(abs(a - b) for a, b in zip(served, self.logprobs, strict=True)) / max(1, len(served))


def step_of(directory: Path) -> int | None:
    match = STEP_DIR.fullmatch(directory.name)
    return int(match.group(1)) if match else None


def ready_checkpoints(weights_dir: Path) -> list[tuple[int, Path]]:
    """Published checkpoints (with READY), oldest first. Hidden and unmarked directories are ignored."""
    if not weights_dir.is_dir():
        return []
    found = []
    for child in weights_dir.iterdir():
        step = step_of(child)
        if step is not None and (child / READY).is_file():
            found.append((step, child))
    return sorted(found)


# --- manifests ----------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path, **extra: Any) -> dict[str, Any]:
    files = {
        p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name not in (MANIFEST, READY)
    }
    manifest = {"files": files, **extra}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def verify_manifest(directory: Path) -> dict[str, Any]:
    """Check every file against the manifest (presence, size, sha256). Returns the manifest."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError) as error:
        raise CheckpointError(f"{directory}: missing or unreadable {MANIFEST}: {error}") from error
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{directory}: {name} is listed in the manifest but missing")
        if path.stat().st_size != expected["size"]:
            raise CheckpointError(
                f"{directory}: {name} has {path.stat().st_size} bytes, "
                f"the manifest says {expected['size']} (truncated?)"
            )
        if _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"{directory}: {name} does not match its sha256 in the manifest (corrupt)")
    return dict(manifest)


# --- safetensors headers ------------------------------------------------------------------------


def safetensors_header(path: Path) -> dict[str, Any]:
    """Parse a safetensors header and check that the data section covers every tensor exactly.

    The format is an 8-byte little-endian header length, a JSON header mapping tensor names to
    dtype, shape and byte offsets, then the data. Parsing it here costs microseconds and needs no
    torch; it catches truncated files before they can reach vLLM.
    """
    try:
        with path.open("rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            if length > 100_000_000:
                raise CheckpointError(f"{path}: implausible safetensors header length {length}")
            header = json.loads(file.read(length))
    except (OSError, struct.error, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file: {error}") from error
    data_size = path.stat().st_size - 8 - length
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if end != data_size:
        raise CheckpointError(f"{path}: tensors need {end} bytes of data, the file has {data_size} (truncated?)")
    return {k: v for k, v in header.items() if k != "__metadata__"}


def tensor_shapes(directory: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) over all safetensors files of a checkpoint."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no *.safetensors files")
    shapes: dict[str, tuple[str, tuple[int, ...]]] = {}
    for path in files:
        for name, info in safetensors_header(path).items():
            shapes[name] = (info["dtype"], tuple(info["shape"]))
    return shapes


def check_compatible(candidate: Path, reference: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """Raise unless ``candidate`` has exactly the tensors (names and shapes) of ``reference``."""
    shapes = tensor_shapes(candidate)
    missing = sorted(set(reference) - set(shapes))
    extra = sorted(set(shapes) - set(reference))
    if missing or extra:
        raise CheckpointError(
            f"{candidate}: another architecture: {len(missing)} tensors missing (e.g. {missing[:2]}), "
            f"{len(extra)} unexpected (e.g. {extra[:2]})"
        )
    for name, (_, shape) in reference.items():
        if shapes[name][1] != shape:
            raise CheckpointError(f"{candidate}: tensor {name} has shape {shapes[name][1]}, expected {shape}")


def verify(candidate: Path, reference: dict[str, tuple[str, tuple[int, ...]]]) -> Canary:
    """Everything the server checks before it lets vLLM read a checkpoint. Returns its canary."""
    if not (candidate / READY).is_file():
        raise CheckpointError(f"{candidate}: no {READY} marker (still being written?)")
    verify_manifest(candidate)
    check_compatible(candidate, reference)
    return Canary.read(candidate)


# --- publishing ---------------------------------------------------------------------------------


def fsync(path: Path) -> None:
    """Flush a file or directory to disk (a directory: so a rename in it survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(weights_dir: Path, step: int, write: Callable[[Path], Canary], **manifest_extra: Any) -> Path:
    """Publish a checkpoint atomically as ``weights_dir/step-NNNNNN``; returns its path.

    ``write(tmp_dir)`` writes the model files and returns the canary. A crash at any point leaves
    either nothing visible, a complete directory without READY (ignored, and replaced by the next
    publish of the same step), or a complete, marked checkpoint.
    """
    weights_dir.mkdir(parents=True, exist_ok=True)
    final = weights_dir / f"step-{step:06d}"
    tmp = weights_dir / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    canary = write(tmp)
    crash_point("mid_publish", step)
    (tmp / CANARY).write_text(canary.to_json())
    write_manifest(tmp, step=step, **manifest_extra)
    for path in tmp.iterdir():
        fsync(path)
    fsync(tmp)
    if final.exists():  # an unmarked leftover of a crashed publish of this step
        if (final / READY).exists():
            raise CheckpointError(f"{final} is already published")
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync(weights_dir)
    marker = final / (READY + ".tmp")
    marker.write_text(json.dumps({"step": step}) + "\n")
    fsync(marker)
    os.rename(marker, final / READY)
    fsync(final)
    return final


def write_served(weights_dir: Path, info: dict[str, Any]) -> None:
    """Record which checkpoint is being served (``info["checkpoint"]``), atomically."""
    tmp = weights_dir / f".{SERVED}.tmp"
    tmp.write_text(json.dumps(info) + "\n")
    os.replace(tmp, weights_dir / SERVED)


def served_checkpoint(weights_dir: Path) -> Path | None:
    try:
        return Path(json.loads((weights_dir / SERVED).read_text())["checkpoint"])
    except (OSError, ValueError, KeyError):
        return None


def prune(weights_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` published checkpoints, never the one being served."""
    served = served_checkpoint(weights_dir)
    protect = {served.resolve()} if served else set()
    published = ready_checkpoints(weights_dir)
    removed = []
    for _, path in published[: max(0, len(published) - keep)]:
        if path.resolve() in protect:
            continue
        (path / READY).unlink(missing_ok=True)  # unmark first: a reader never sees a half-deleted one
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    for leftover in weights_dir.glob(".tmp-step-*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
