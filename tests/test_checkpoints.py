"""The published-checkpoint format: atomic publish, verification, pruning (no torch needed)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from exitagent.errors import CheckpointError
from exitagent.serving import checkpoints
from exitagent.serving.checkpoints import Canary


def write_safetensors(path: Path, tensors: dict[str, tuple[int, ...]]) -> None:
    header, offset = {}, 0
    for name, shape in tensors.items():
        size = 4
        for dim in shape:
            size *= dim
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)


SHAPES = {"embed.weight": (8, 4), "head.weight": (4, 8)}
CANARY = Canary((1, 2, 3), (-1.0, -2.0), 0.1)
REFERENCE = {name: ("F32", shape) for name, shape in SHAPES.items()}


def writer(shapes: dict[str, tuple[int, ...]] = SHAPES):
    def write(directory: Path) -> Canary:
        write_safetensors(directory / "model.safetensors", shapes)
        (directory / "config.json").write_text("{}")
        return CANARY

    return write


def test_publish_then_verify(tmp_path: Path) -> None:
    path = checkpoints.publish(tmp_path, 7, writer())
    assert path.name == "step-000007" and (path / checkpoints.READY).is_file()
    assert checkpoints.verify(path, REFERENCE) == CANARY
    assert checkpoints.ready_checkpoints(tmp_path) == [(7, path)]
    assert not list(tmp_path.glob(".tmp-*"))


def test_unmarked_and_hidden_directories_are_ignored(tmp_path: Path) -> None:
    (tmp_path / "step-000003").mkdir()
    (tmp_path / ".tmp-step-000004-1").mkdir()
    assert checkpoints.ready_checkpoints(tmp_path) == []
    with pytest.raises(CheckpointError, match="READY"):
        checkpoints.verify(tmp_path / "step-000003", REFERENCE)


def test_truncation_is_caught_by_manifest_and_by_header(tmp_path: Path) -> None:
    path = checkpoints.publish(tmp_path, 1, writer())
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        checkpoints.verify(path, REFERENCE)
    with pytest.raises(CheckpointError, match="truncated"):
        checkpoints.safetensors_header(weights)


def test_corruption_with_same_size_is_caught(tmp_path: Path) -> None:
    path = checkpoints.publish(tmp_path, 1, writer())
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        checkpoints.verify(path, REFERENCE)


def test_other_architecture_is_refused(tmp_path: Path) -> None:
    wider = checkpoints.publish(tmp_path, 1, writer({"embed.weight": (8, 6), "head.weight": (6, 8)}))
    with pytest.raises(CheckpointError, match="shape"):
        checkpoints.verify(wider, REFERENCE)
    renamed = checkpoints.publish(tmp_path, 2, writer({"embed.weight": (8, 4), "lm_head.weight": (4, 8)}))
    with pytest.raises(CheckpointError, match="another architecture"):
        checkpoints.verify(renamed, REFERENCE)


def test_republishing_a_crashed_step_replaces_the_leftover(tmp_path: Path) -> None:
    leftover = tmp_path / "step-000005"
    leftover.mkdir()
    (leftover / "junk").write_text("half written")
    path = checkpoints.publish(tmp_path, 5, writer())
    assert not (path / "junk").exists() and (path / checkpoints.READY).exists()
    with pytest.raises(CheckpointError, match="already published"):
        checkpoints.publish(tmp_path, 5, writer())


def test_prune_keeps_newest_and_the_served_one(tmp_path: Path) -> None:
    paths = [checkpoints.publish(tmp_path, step, writer()) for step in range(1, 6)]
    checkpoints.write_served(tmp_path, {"checkpoint": str(paths[0])}, "host-8000")
    removed = checkpoints.prune(tmp_path, keep=2)
    assert removed == paths[1:3]
    assert [p for _, p in checkpoints.ready_checkpoints(tmp_path)] == [paths[0], *paths[3:]]


def test_prune_keeps_what_any_server_serves(tmp_path: Path) -> None:
    """Two servers on one weights directory: each has its own record, neither overwrites the
    other's, and pruning keeps both checkpoints (one shared SERVED.json lost one of them)."""
    paths = [checkpoints.publish(tmp_path, step, writer()) for step in range(1, 7)]
    checkpoints.write_served(tmp_path, {"checkpoint": str(paths[0])}, checkpoints.server_id(8000, "node-a"))
    checkpoints.write_served(tmp_path, {"checkpoint": str(paths[1])}, checkpoints.server_id(8001, "node-a"))
    assert checkpoints.served_checkpoints(tmp_path) == {paths[0], paths[1]}
    assert checkpoints.prune(tmp_path, keep=2) == paths[2:4]
    assert [p for _, p in checkpoints.ready_checkpoints(tmp_path)] == [paths[0], paths[1], *paths[4:]]
    checkpoints.forget_served(tmp_path, "node-a-8000")  # a clean shutdown releases its checkpoint
    assert checkpoints.prune(tmp_path, keep=2) == [paths[0]]


def test_a_record_of_a_dead_server_on_this_machine_protects_nothing(tmp_path: Path) -> None:
    import socket

    paths = [checkpoints.publish(tmp_path, step, writer()) for step in range(1, 4)]
    (tmp_path / checkpoints.SERVED_DIR).mkdir()
    dead = 2**22 + 7  # above the kernel's largest pid: no such process
    record = {"checkpoint": str(paths[0]), "host": socket.gethostname(), "pid": dead, "server": "x-1"}
    (tmp_path / checkpoints.SERVED_DIR / "x-1.json").write_text(json.dumps(record))
    elsewhere = {**record, "checkpoint": str(paths[1]), "host": "another-machine", "server": "y-1"}
    (tmp_path / checkpoints.SERVED_DIR / "y-1.json").write_text(json.dumps(elsewhere))
    (tmp_path / checkpoints.SERVED_DIR / "z-1.json").write_text("{not json")  # a torn file: ignored
    assert checkpoints.served_checkpoints(tmp_path) == {paths[1]}  # kill -9 here; alive for all we know there
    assert checkpoints.prune(tmp_path, keep=1) == [paths[0]]


def test_the_single_served_file_of_earlier_versions_still_protects(tmp_path: Path) -> None:
    paths = [checkpoints.publish(tmp_path, step, writer()) for step in range(1, 4)]
    (tmp_path / checkpoints.SERVED).write_text(json.dumps({"checkpoint": str(paths[0])}))
    assert checkpoints.prune(tmp_path, keep=1) == [paths[1]]


def test_canary_distance() -> None:
    assert CANARY.distance([-1.05, -1.95]) == pytest.approx(0.05)
    with pytest.raises(CheckpointError, match="length"):
        CANARY.distance([-1.0])


@pytest.mark.anyio
async def test_a_reload_waits_while_the_engine_is_down_instead_of_rejecting(tmp_path: Path) -> None:
    from exitagent.serving import engine
    from exitagent.serving.reload import Admin, Reloader, ServingState
    from exitagent.types import PolicyVersion

    path = checkpoints.publish(tmp_path, 3, writer())
    admin = Admin(f"http://127.0.0.1:{engine.free_port()}", "policy", timeout_s=2.0)  # no engine listens here
    state = ServingState(PolicyVersion.at_step(0), tmp_path / "base")
    tried: list[str] = []

    async def exclusive(work) -> None:  # type: ignore[no-untyped-def]
        tried.append("reload")
        await work()

    reloader = Reloader(admin, tmp_path, state, REFERENCE, exclusive)
    try:
        assert await reloader.poll() is False
    finally:
        await admin.aclose()
    assert tried == [] and state.rejected == set() and reloader.candidates() == [(3, path)]  # tried again later
