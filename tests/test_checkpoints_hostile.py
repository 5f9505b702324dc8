"""Malformed, hostile and out-of-space checkpoints: each is one clear ``CheckpointError`` (or a
logged rejection), never a crash, and the weights served before keep serving.

The reload tests run ``Reloader`` against a stand-in vLLM on loopback (``FakeEngine``: the admin
routes and ``/v1/completions`` prompt log-probabilities); the real server is
``tests/integration/test_serve_hostile.py``.
"""

from __future__ import annotations

import json
import math
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from exitagent.errors import CheckpointError
from exitagent.serving import checkpoints
from exitagent.serving.checkpoints import Canary
from tests import disks
from tests.test_checkpoints import CANARY, REFERENCE, write_safetensors, writer

# --- verification, case by case -------------------------------------------------------------------


def _raw_safetensors(path: Path, header: Any, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


BAD_HEADERS = {
    "a list": ([1, 2, 3], "not a tensor map"),
    "a string": ("weights", "not a tensor map"),
    "entry not a mapping": ({"w": [0, 4]}, "not a mapping"),
    "no dtype": ({"w": {"shape": [1], "data_offsets": [0, 4]}}, "no dtype"),
    "no shape": ({"w": {"dtype": "F32", "data_offsets": [0, 4]}}, "no shape"),
    "shape of strings": ({"w": {"dtype": "F32", "shape": ["1"], "data_offsets": [0, 4]}}, "no shape"),
    "negative dimension": ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, "no shape"),
    "no offsets": ({"w": {"dtype": "F32", "shape": [1]}}, "data_offsets"),
    "float offsets": ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4.0]}}, "data_offsets"),
    "reversed offsets": ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, "data_offsets"),
    "three offsets": ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 2, 4]}}, "data_offsets"),
    "offsets beyond the file": ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 1 << 40]}}, "truncated"),
    "dtype a number": ({"w": {"dtype": 7, "shape": [1], "data_offsets": [0, 4]}}, "no dtype"),
}


@pytest.mark.parametrize("case", BAD_HEADERS)
def test_a_malformed_safetensors_header_is_refused(tmp_path: Path, case: str) -> None:
    header, message = BAD_HEADERS[case]
    _raw_safetensors(tmp_path / "model.safetensors", header, b"\0" * 4)
    with pytest.raises(CheckpointError, match=message):
        checkpoints.safetensors_header(tmp_path / "model.safetensors")


def test_a_deeply_nested_header_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    raw = b"[" * 100_000 + b"]" * 100_000
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(CheckpointError):
        checkpoints.safetensors_header(path)


def _published_then(tmp_path: Path, change: Callable[[Path], None], step: int = 1) -> Path:
    path = checkpoints.publish(tmp_path, step, writer())
    change(path)
    return path


def _edit_manifest(edit: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def change(path: Path) -> None:
        manifest = json.loads((path / checkpoints.MANIFEST).read_text())
        edit(manifest)
        (path / checkpoints.MANIFEST).write_text(json.dumps(manifest))

    return change


def _header_as_list(path: Path) -> None:  # valid JSON, not a tensor map; manifest updated to match
    _raw_safetensors(path / "model.safetensors", [1, 2])
    (path / checkpoints.MANIFEST).unlink()
    checkpoints.write_manifest(path)


MALFORMED: dict[str, tuple[Callable[[Path], None], str]] = {
    "entry without a size": (_edit_manifest(lambda m: m["files"]["config.json"].pop("size")), "integer size"),
    "size as a string": (_edit_manifest(lambda m: m["files"]["config.json"].update(size="2")), "integer size"),
    "entry a number": (_edit_manifest(lambda m: m["files"].update({"config.json": 2})), "integer size"),
    "files a list": (_edit_manifest(lambda m: m.update(files=["config.json"])), "'files' mapping"),
    "manifest a list": (lambda p: (p / checkpoints.MANIFEST).write_text("[]"), "'files' mapping"),
    "manifest not JSON": (lambda p: (p / checkpoints.MANIFEST).write_text("{"), "unreadable"),
    "name leading out": (_edit_manifest(lambda m: m["files"].update({"../x": {"size": 1, "sha256": "0"}})),
                         "not a file of the checkpoint"),
    "file missing": (lambda p: (p / "config.json").unlink(), "missing"),
    "file unlisted": (lambda p: (p / "pytorch_model.bin").write_bytes(b"\0" * 8), "not listed"),
    "index unlisted": (lambda p: (p / "model.safetensors.index.json").write_text("{}"), "not listed"),
    "header a list": (_header_as_list, "not a tensor map"),
    "canary NaN": (lambda p: _rewrite_canary(p, [math.nan, -2.0]), "not a finite number"),
    "canary infinite": (lambda p: _rewrite_canary(p, [-1.0, -math.inf]), "not a finite number"),
    "canary too short": (lambda p: _rewrite_canary(p, [-1.0]), "expected one per token"),
    "canary strings": (lambda p: _rewrite_canary(p, ["a", "b"]), "not a finite number"),
}


def _rewrite_canary(path: Path, logprobs: list[Any]) -> None:
    data = json.loads((path / checkpoints.CANARY).read_text())
    (path / checkpoints.CANARY).write_text(json.dumps({**data, "logprobs": logprobs}))
    (path / checkpoints.MANIFEST).unlink()
    checkpoints.write_manifest(path)  # a well-formed manifest: the canary itself must be refused


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_checkpoint_is_one_checkpoint_error(tmp_path: Path, case: str) -> None:
    change, message = MALFORMED[case]
    path = _published_then(tmp_path, change)
    with pytest.raises(CheckpointError, match=message):
        checkpoints.verify(path, REFERENCE)


def test_served_nan_or_infinity_fails_the_canary() -> None:
    for served in ([math.nan, -2.0], [-1.0, math.inf], [-math.inf, -2.0]):
        with pytest.raises(CheckpointError, match="not a finite number"):
            CANARY.distance(served)


def test_a_step_directory_that_is_a_symlink_out_is_refused(tmp_path: Path) -> None:
    elsewhere = checkpoints.publish(tmp_path / "elsewhere", 1, writer())
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "step-000002").symlink_to(elsewhere)
    [(_, path)] = checkpoints.ready_checkpoints(weights)
    with pytest.raises(CheckpointError, match="symlink out"):
        checkpoints.verify(path, REFERENCE)


def test_a_file_symlinked_out_is_refused_even_when_its_hash_matches(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    path = checkpoints.publish(tmp_path / "weights", 1, writer())
    (path / "config.json").rename(outside / "config.json")
    (path / "config.json").symlink_to(outside / "config.json")  # same bytes, so the manifest matches
    with pytest.raises(CheckpointError, match="outside"):
        checkpoints.verify(path, REFERENCE)


def test_symlinks_inside_the_weights_directory_are_accepted(tmp_path: Path) -> None:
    first = checkpoints.publish(tmp_path, 1, writer())
    second = checkpoints.publish(tmp_path, 2, writer())
    (second / "config.json").unlink()
    (second / "config.json").symlink_to(first / "config.json")
    assert checkpoints.verify(second, REFERENCE) == CANARY


def test_a_symlink_loop_is_refused(tmp_path: Path) -> None:
    path = checkpoints.publish(tmp_path, 1, writer())
    (path / "loop").symlink_to(path / "loop")
    with pytest.raises(CheckpointError):
        checkpoints.verify(path, REFERENCE)


def test_files_removed_during_verification_give_a_checkpoint_error(tmp_path: Path) -> None:
    """A thread deletes the files while they are verified: every outcome is a CheckpointError."""
    many = {f"layer{i}.weight": (64, 64) for i in range(2)}

    def write(directory: Path) -> Canary:
        for i in range(40):
            write_safetensors(directory / f"part-{i:02d}.safetensors", {f"l{i}.{k}": s for k, s in many.items()})
        return CANARY

    kinds: set[str] = set()
    for step in range(1, 16):
        path = checkpoints.publish(tmp_path, step, write)
        files = sorted(path.glob("part-*"))
        remover = threading.Thread(target=lambda fs=files: [f.unlink() for f in reversed(fs)])
        remover.start()
        with pytest.raises(CheckpointError) as raised:
            checkpoints.verify(path, {})
        remover.join()
        kinds.add(str(raised.value).split(": ", 1)[1][:30])
    print(kinds)


# --- a full disk --------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with disks.small_disk(tmp_path / "disk") as mount:
        yield mount


def test_publishing_into_a_full_disk_is_one_error_and_leaves_nothing(small_disk: Path) -> None:
    def big(directory: Path) -> Canary:
        write_safetensors(directory / "model.safetensors", {"w": (512, 1024)})  # 2 MiB
        return CANARY

    with pytest.raises(CheckpointError, match="nothing was published"):
        checkpoints.publish(small_disk, 1, big)
    assert list(small_disk.iterdir()) == []
    assert checkpoints.publish(small_disk, 1, writer()).name == "step-000001"  # space again: it works


def test_recording_the_served_version_on_a_full_disk_keeps_the_old_record(small_disk: Path) -> None:
    checkpoints.write_served(small_disk, {"checkpoint": "step-000001"}, "a-1")
    disks.fill(small_disk)
    with pytest.raises(CheckpointError, match="could not record"):
        checkpoints.write_served(small_disk, {"checkpoint": "step-000002", "pad": "x" * 8192}, "a-1")
    assert checkpoints.served_checkpoints(small_disk) == {Path("step-000001")}
    assert not list(small_disk.rglob(".*tmp*"))


def test_serve_keeps_going_when_the_served_record_cannot_be_written(small_disk: Path) -> None:
    from exitagent.serving.reload import Reloader, ServingState
    from exitagent.types import PolicyVersion

    state = ServingState(PolicyVersion.at_step(0), small_disk / "base")
    reloader = Reloader(None, small_disk, state, REFERENCE, None)  # type: ignore[arg-type]  # (no engine needed)
    reloader.record_served()
    disks.fill(small_disk)
    state.last_error = "x" * 8192  # more than the few bytes the fill may have left
    reloader.record_served()  # logged (served_record_failed), not raised
    assert checkpoints.served_checkpoints(small_disk) == {small_disk / "base"}
    assert not list(small_disk.rglob(".*tmp*"))
