"""The ``Sandbox`` seam's behaviour on the real host backends, the factory, and the fake."""

from __future__ import annotations

import dataclasses
import errno
import sys
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from exitagent.errors import ConfigError, SandboxError
from sandboxes.base import ExecResult, Limits, Sandbox, SandboxSpec
from sandboxes.cgroups import RunCgroup
from sandboxes.factory import chosen_backend, open_sandbox
from sandboxes.fake import FakeCall, FakeSandbox
from sandboxes.local import probe
from sandboxes.runner import LAUNCHER_FAILED, launcher_argv

pytestmark = pytest.mark.anyio


# --- values and the factory ----------------------------------------------------------------------


def test_limits_and_results_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Limits().wall_s = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        ExecResult("", "", 0).exit_code = 1  # type: ignore[misc]
    with pytest.raises(ConfigError):
        Limits(wall_s=0)


def test_backend_defaults_to_local_and_opting_in_takes_a_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EXITAGENT_SANDBOX", raising=False)
    assert chosen_backend() == "local"
    monkeypatch.setenv("EXITAGENT_SANDBOX", "process")
    assert chosen_backend() == "process"
    assert chosen_backend("local") == "local"
    with pytest.raises(ConfigError):
        chosen_backend("docker")


def test_missing_input_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        SandboxSpec(inputs={"data": tmp_path / "nope"})


def test_probe_reports_a_broken_bwrap() -> None:
    failure = probe("/bin/false")
    assert failure is not None and "EXITAGENT_SANDBOX=process" in failure


async def test_process_backend_warns_loudly(tmp_path: Path) -> None:
    with capture_logs() as logs:
        async with open_sandbox("process", base_dir=tmp_path):
            pass
    assert any(e["event"] == "unisolated_sandbox_opened" and e["log_level"] == "warning" for e in logs)


async def test_open_sandbox_can_be_awaited_or_entered() -> None:
    sbx = await open_sandbox("fake")
    assert isinstance(sbx, Sandbox)
    await sbx.close()
    async with open_sandbox("fake") as entered:
        await entered.write_file("x", "1")
    with pytest.raises(SandboxError):
        await entered.read_file("x")  # closed on exit


# --- the host backends ---------------------------------------------------------------------------


async def test_nonzero_exit_is_a_result(make_sandbox: Callable[..., Any]) -> None:
    async with make_sandbox() as sbx:
        result = await sbx.run_python("import sys\nprint('out')\nsys.exit(3)\n")
    assert (result.exit_code, result.stdout, result.timed_out, result.ok) == (3, "out\n", False, False)


async def test_stdin_cwd_and_env_reach_the_code(make_sandbox: Callable[..., Any]) -> None:
    async with make_sandbox(env={"FROM_SPEC": "a"}) as sbx:
        await sbx.write_file("sub/keep.txt", "")
        result = await sbx.exec(
            ["sh", "-c", 'cat; echo " $FROM_SPEC $FROM_CALL"; ls'],
            cwd="sub",
            env={"FROM_CALL": "b"},
            stdin=b"piped",
        )
    assert result.ok and result.stdout == "piped a b\nkeep.txt\n"


async def test_files_round_trip_and_list(make_sandbox: Callable[..., Any]) -> None:
    async with make_sandbox() as sbx:
        await sbx.write_file("dir/a.txt", "text")
        await sbx.write_file("b.bin", b"\x00\x01")
        made = await sbx.run_python("open('dir/made.txt', 'w').write('by code')")
        assert made.ok, made.stderr
        assert await sbx.list_files() == ["b.bin", "dir/", "runfile.py"]
        assert await sbx.list_files("dir") == ["a.txt", "made.txt"]
        assert await sbx.read_file("dir/made.txt") == "by code"
        assert await sbx.read_file("b.bin", binary=True) == b"\x00\x01"
        with pytest.raises(FileNotFoundError):
            await sbx.read_file("missing.txt")
        with pytest.raises(OSError) as too_big:
            await sbx.read_file("dir/a.txt", max_bytes=2)
        assert too_big.value.errno == errno.EFBIG


async def test_paths_cannot_leave_the_workspace(make_sandbox: Callable[..., Any]) -> None:
    async with make_sandbox() as sbx:
        for path in ("../escape", "/etc/passwd", "a/../../escape"):
            with pytest.raises(PermissionError):
                await sbx.write_file(path, "x")
            with pytest.raises(PermissionError):
                await sbx.read_file(path)


async def test_inputs_are_visible_and_read_only(make_sandbox: Callable[..., Any], tmp_path: Path) -> None:
    data = tmp_path / "task-data"
    data.mkdir()
    (data / "train.csv").write_text("x,y\n1,2\n")
    async with make_sandbox(inputs={"input": data}) as sbx:
        seen = await sbx.run_python("print(open('input/train.csv').read(), end='')")
        assert seen.stdout == "x,y\n1,2\n"
        assert await sbx.read_file("input/train.csv") == "x,y\n1,2\n"
        assert "input/" in await sbx.list_files()
        with pytest.raises(PermissionError):
            await sbx.write_file("input/train.csv", "tampered")
        if sbx.backend == "local":
            tamper = await sbx.run_python("open('input/train.csv', 'w').write('tampered')")
            assert tamper.exit_code == 1 and "Read-only file system" in tamper.stderr
    assert (data / "train.csv").read_text() == "x,y\n1,2\n"


async def test_close_removes_the_workspace_and_cgroups(
    make_sandbox: Callable[..., Any], cgroup_leaves: Callable[[], list[str]]
) -> None:
    async with make_sandbox() as sbx:
        await sbx.run_python("open('f', 'w').write('x')")
        root = sbx.root
    assert not root.exists() and cgroup_leaves() == []
    with pytest.raises(SandboxError):
        await sbx.exec(["true"])


async def test_cancelling_the_caller_kills_the_run(
    make_sandbox: Callable[..., Any], leftovers: Callable[[], list[int]]
) -> None:
    async with make_sandbox() as sbx:
        started = time.monotonic()
        with anyio.move_on_after(0.5):
            await sbx.exec(["sh", "-c", "sleep 60 & sleep 60"])
        assert time.monotonic() - started < 3
        assert leftovers() == []


async def test_runs_are_bounded_by_the_core_count(make_sandbox: Callable[..., Any]) -> None:
    import os

    cores = os.cpu_count() or 1
    async with make_sandbox() as sbx:
        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            for _ in range(cores * 2):
                tg.start_soon(sbx.exec, ["sleep", "0.3"])
    assert time.monotonic() - started >= 0.55  # two waves of `cores` runs each


# --- the fake --------------------------------------------------------------------------------------


async def test_fake_scripts_results_and_records_calls(tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("input")
    spec = SandboxSpec(inputs={"data/in.txt": tmp_path / "in.txt"})
    scripted = ExecResult("42\n", "", 0)
    async with FakeSandbox(spec, results=[scripted], files={"seed.py": "x = 1"}) as sbx:
        assert await sbx.run_python("print(42)") is scripted
        assert (await sbx.exec(["ls"])).exit_code == 0  # script used up: a quiet success
        assert sbx.calls[0] == FakeCall(("python", "runfile.py"), ".", {}, None, None)
        assert await sbx.read_file("data/in.txt") == "input"
        assert await sbx.list_files() == ["data/", "runfile.py", "seed.py"]
        with pytest.raises(FileNotFoundError):
            await sbx.read_file("nope")


async def test_fake_respond_callback_sees_files() -> None:
    def respond(call: FakeCall, sbx: FakeSandbox) -> ExecResult:
        return ExecResult(sbx.files[call.cmd[-1]].decode().upper(), "", 0)

    sbx = FakeSandbox(respond=respond)
    assert (await sbx.run_python("print(1)", filename="a.py")).stdout == "PRINT(1)"


async def test_launcher_refuses_to_run_outside_its_cgroup(tmp_path: Path) -> None:
    unjoinable = RunCgroup(leaves={"pids": tmp_path / "not-a-cgroup"})
    argv = launcher_argv(["echo", "ran"], Limits(), unjoinable, "mark-123")
    done = await anyio.run_process(argv, check=False)
    assert done.returncode == LAUNCHER_FAILED and done.stdout == b""
    assert done.stderr.startswith(b"mark-123:") and b"cannot join" in done.stderr


async def test_the_interpreter_is_bound_after_the_private_tmp() -> None:
    # A checkout (and its .venv) under /tmp, as CI clones are, must stay visible inside the jail:
    # the read-only bind of the interpreter has to come after the private /tmp mount.
    async with open_sandbox("local") as sandbox:
        argv = sandbox._command(["python", "-c", "pass"], PurePosixPath("."), {})  # type: ignore[attr-defined]
    tmpfs = argv.index("/tmp", argv.index("/dev/shm"))  # a quota-volume bind or a tmpfs
    binds = [i for i, arg in enumerate(argv) if arg == sys.prefix and argv[i - 2] == "--ro-bind"]
    assert binds and all(i > tmpfs for i in binds)

