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
import math
import os
import re
import shutil
import socket
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
SERVED_DIR = "served"  # one record per server: served/HOST-PORT.json, what that server serves now
SERVED = "SERVED.json"  # the single record of earlier versions: still read, never written
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
            canary = cls(tuple(data["token_ids"]), tuple(data["logprobs"]), float(data["tolerance"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(f"{directory}: unreadable {CANARY}: {error}") from error
        if not canary.token_ids or not all(type(t) is int and t >= 0 for t in canary.token_ids):
            raise CheckpointError(f"{directory}: {CANARY} token_ids must be non-negative integers")
        if len(canary.logprobs) != len(canary.token_ids) - 1:
            raise CheckpointError(f"{directory}: {CANARY} has {len(canary.logprobs)} logprobs for "
                                  f"{len(canary.token_ids)} tokens (expected one per token after the first)")
        _check_finite(canary.logprobs, f"{directory}: {CANARY} logprobs")
        return canary

    def distance(self, served: list[float]) -> float:
        """Mean absolute difference between these log-probabilities and the served ones.

        Any NaN or infinity fails: ``NaN > tolerance`` is false, so a comparison alone would pass it."""
        if len(served) != len(self.logprobs):
            raise CheckpointError(f"canary length mismatch: served {len(served)}, expected {len(self.logprobs)}")
        _check_finite(served, "served canary logprobs")
        _check_finite(self.logprobs, "expected canary logprobs")
        return sum(abs(a - b) for a, b in zip(served, self.logprobs, strict=True)) / max(1, len(served))


def _check_finite(values: tuple[float, ...] | list[float], what: str) -> None:
    for index, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise CheckpointError(f"{what}: value {index} is {value!r}, not a finite number")


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


def _manifest_files(manifest: Any, directory: Path) -> dict[str, tuple[int, str]]:
    """name -> (size, sha256) from a manifest, every field checked for its type."""
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise CheckpointError(f"{directory}: {MANIFEST} has no 'files' mapping of names to entries")
    entries = {}
    for name, entry in files.items():
        size = entry.get("size") if isinstance(entry, dict) else None
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        if type(size) is not int or size < 0 or not isinstance(digest, str):
            raise CheckpointError(f"{directory}: {MANIFEST} entry {name!r} needs an integer size and a sha256")
        if name in ("", ".", "..", MANIFEST, READY) or "/" in name or "\\" in name or "\0" in name:
            raise CheckpointError(f"{directory}: {MANIFEST} lists {name!r}, which is not a file of the checkpoint")
        entries[name] = (size, digest)
    return entries


def verify_manifest(directory: Path, *, complete: bool = False) -> dict[str, Any]:
    """Check every file against the manifest (presence, size, sha256). Returns the manifest.

    ``complete``: also refuse any file the manifest does not list (it would reach vLLM unhashed)."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError, RecursionError) as error:
        raise CheckpointError(f"{directory}: missing or unreadable {MANIFEST}: {error}") from error
    files = _manifest_files(manifest, directory)
    try:
        unlisted = sorted(p.name for p in directory.iterdir() if p.name not in (*files, MANIFEST, READY))
        if complete and unlisted:
            raise CheckpointError(f"{directory}: {unlisted[:3]} not listed in {MANIFEST}; refused "
                                  f"(every file vLLM may load must be hashed)")
        for name, (size, digest) in files.items():
            path = directory / name
            if not path.is_file():
                raise CheckpointError(f"{directory}: {name} is listed in the manifest but missing")
            if path.stat().st_size != size:
                raise CheckpointError(f"{directory}: {name} has {path.stat().st_size} bytes, "
                                      f"the manifest says {size} (truncated?)")
            if _sha256(path) != digest:
                raise CheckpointError(f"{directory}: {name} does not match its sha256 in the manifest (corrupt)")
    except OSError as error:  # e.g. a file removed or made unreadable while it is verified
        raise CheckpointError(f"{directory}: cannot read the checkpoint: {error}") from error
    return dict(manifest)


def check_contained(candidate: Path) -> None:
    """Refuse a step directory, or any entry in it, that a symlink leads out of the weights directory."""
    root = candidate.parent.resolve()
    if candidate.resolve().parent != root:
        raise CheckpointError(f"{candidate}: a symlink out of the weights directory {root}; refused")
    for path in candidate.iterdir():
        resolved = path.resolve()
        if root not in resolved.parents:
            raise CheckpointError(f"{candidate}: {path.name} is a symlink to {resolved}, outside {root}; refused")


# --- safetensors headers ------------------------------------------------------------------------


def safetensors_header(path: Path) -> dict[str, Any]:
    """Parse a safetensors header and check that the data section covers every tensor exactly.

    The format is an 8-byte little-endian header length, a JSON header mapping tensor names to
    dtype, shape and byte offsets, then the data. Parsing it here costs microseconds and needs no
    torch; it catches truncated files and malformed headers before they can reach vLLM.
    """
    try:
        with path.open("rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            if length > 100_000_000:
                raise CheckpointError(f"{path}: implausible safetensors header length {length}")
            header = json.loads(file.read(length))
        data_size = path.stat().st_size - 8 - length
    except (OSError, struct.error, ValueError, RecursionError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file: {error}") from error
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is a {type(header).__name__}, not a tensor map")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = 0
    for name, info in tensors.items():
        end = max(end, _tensor_end(path, name, info))
    if end != data_size:
        raise CheckpointError(f"{path}: tensors need {end} bytes of data, the file has {data_size} (truncated?)")
    return tensors


def _tensor_end(path: Path, name: str, info: Any) -> int:
    """Where the tensor's bytes end, after checking its entry has the types the format requires."""
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: tensor {name!r} is not a mapping of dtype, shape and data_offsets")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(info.get("dtype"), str):
        raise CheckpointError(f"{path}: tensor {name!r} has no dtype string")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise CheckpointError(f"{path}: tensor {name!r} has no shape (a list of non-negative integers)")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"{path}: tensor {name!r} has no valid data_offsets [begin, end]")
    return int(offsets[1])


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
    try:
        check_contained(candidate)
    except (OSError, RuntimeError) as error:  # a symlink loop, or the directory removed meanwhile
        raise CheckpointError(f"{candidate}: cannot resolve its files: {error}") from error
    verify_manifest(candidate, complete=True)
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
    final = weights_dir / f"step-{step:06d}"
    tmp = weights_dir / f".tmp-step-{step:06d}-{os.getpid()}"
    try:
        weights_dir.mkdir(parents=True, exist_ok=True)
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
    except OSError as error:  # a full disk, typically: leave nothing half-written behind
        shutil.rmtree(tmp, ignore_errors=True)
        if final.is_dir() and not (final / READY).exists():
            shutil.rmtree(final, ignore_errors=True)
        raise CheckpointError(f"could not publish step {step} into {weights_dir}: {error.strerror or error} "
                              f"(disk full?); nothing was published and its temporary files were removed") from error
    return final


def server_id(port: int, host: str | None = None) -> str:
    """The name of one server's record: its machine and gateway port (a restart on the same port
    replaces its own record instead of leaving one behind)."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", host or socket.gethostname()) or "host"
    return f"{name}-{port}"


def write_served(weights_dir: Path, info: dict[str, Any], server: str) -> None:
    """Record which checkpoint ``server`` serves (``info["checkpoint"]``) in ``served/SERVER.json``,
    atomically. Each server has its own file: with one shared file, servers on one weights directory
    overwrote each other and pruning could delete a checkpoint another server was serving."""
    folder = weights_dir / SERVED_DIR
    final = folder / f"{server}.json"
    tmp = folder / f".{server}.json.tmp-{os.getpid()}"
    try:
        folder.mkdir(exist_ok=True)
        tmp.write_text(json.dumps({**info, "server": server, "pid": os.getpid(), "host": socket.gethostname()}) + "\n")
        os.replace(tmp, final)
    except OSError as error:  # a full disk: the previous record stays whole, no partial file is left
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"could not record the served checkpoint in {final}: "
                              f"{error.strerror or error}") from error


def forget_served(weights_dir: Path, server: str) -> None:
    """Remove ``server``'s record (a clean shutdown): it no longer holds a checkpoint back from pruning."""
    (weights_dir / SERVED_DIR / f"{server}.json").unlink(missing_ok=True)


def served_records(weights_dir: Path) -> dict[str, dict[str, Any]]:
    """Every live server's record, by server id. A record whose server ran on this machine and whose
    process is gone is skipped (a ``kill -9``); records from other machines are kept, because
    nothing here can tell whether their servers live (a restart on the same port replaces its own).
    The single ``SERVED.json`` of earlier versions is read too, as server ``legacy``."""
    records: dict[str, dict[str, Any]] = {}
    paths = sorted((weights_dir / SERVED_DIR).glob("*.json")) if (weights_dir / SERVED_DIR).is_dir() else []
    for path in [*paths, weights_dir / SERVED]:
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(info, dict) or not isinstance(info.get("checkpoint"), str):
            continue
        pid = info.get("pid")
        if info.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
            continue
        records[str(info.get("server", "legacy")) if path.name != SERVED else "legacy"] = info
    return records


def served_checkpoints(weights_dir: Path) -> set[Path]:
    """The checkpoint directories any live server serves (see ``served_records``)."""
    return {Path(info["checkpoint"]) for info in served_records(weights_dir).values()}


def prune(weights_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` published checkpoints, never one that any server serves."""
    protect = {path.resolve() for path in served_checkpoints(weights_dir)}
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
