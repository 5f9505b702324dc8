"""The E2B adapter against a stand-in with the SDK's surface, raising the SDK's real exceptions.

The stand-in copies what ``AsyncSandbox`` offers the adapter (``create``, ``commands.run``,
``files.write/read/list``, ``set_timeout``, ``kill``); nothing of ours is replaced. The live test
runs only with ``E2B_API_KEY`` and ``EXITAGENT_E2B_LIVE=1``.
"""

from __future__ import annotations

import os
from collections import deque
from pathlib import Path
from typing import Any, ClassVar

import anyio
import httpx
import pytest

e2b = pytest.importorskip("e2b_code_interpreter", reason="the E2B SDK is an optional extra")

from exitagent.errors import SandboxCrashed, SandboxUnavailable  # noqa: E402
from sandboxes.base import Limits, SandboxSpec  # noqa: E402
from sandboxes.e2b import E2BSandbox, is_transient  # noqa: E402
from sandboxes.factory import open_sandbox  # noqa: E402

pytestmark = pytest.mark.anyio


class _Commands:
    def __init__(self) -> None:
        self.runs: list[dict[str, Any]] = []
        self.outcomes: deque[Any] = deque()  # CommandResults or SDK exceptions, in order

    # The SDK's parameter names, timeout included (hence the noqa).
    async def run(
        self,
        cmd: str,
        *,
        cwd: str | None = None,
        envs: Any = None,
        timeout: float = 60,  # noqa: ASYNC109
    ) -> Any:
        self.runs.append({"cmd": cmd, "cwd": cwd, "envs": envs, "timeout": timeout})
        outcome = self.outcomes.popleft() if self.outcomes else e2b.CommandResult("", "", 0, None)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


class _Files:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    async def write(self, path: str, data: str | bytes) -> None:
        self.data[path] = data.encode() if isinstance(data, str) else bytes(data)

    async def read(self, path: str, format: str = "text") -> Any:
        if path not in self.data:
            raise e2b.FileNotFoundException(f"{path} not found")
        return bytearray(self.data[path]) if format == "bytes" else self.data[path].decode()

    async def list(self, path: str) -> list[Any]:
        below = [p[len(path) + 1 :] for p in self.data if p.startswith(path + "/")]
        names = {rest.split("/")[0]: "/" in rest for rest in below}
        kind = {True: e2b.FileType.DIR, False: e2b.FileType.FILE}
        return [
            e2b.EntryInfo(
                name=n,
                type=kind[is_dir],
                path=f"{path}/{n}",
                size=0,
                mode=0,
                permissions="",
                owner="",
                group="",
                modified_time=None,
                symlink_target=None,
            )
            for n, is_dir in names.items()
        ]


def stand_in(*create_failures: BaseException) -> Any:
    """A fresh ``AsyncSandbox`` stand-in class whose ``create`` first raises ``create_failures``."""

    class StandInVM:
        failures: ClassVar[deque[BaseException]] = deque(create_failures)
        created: ClassVar[list[dict[str, Any]]] = []
        instances: ClassVar[list[StandInVM]] = []

        def __init__(self) -> None:
            self.sandbox_id = f"sbx-{len(self.instances)}"
            self.commands, self.files = _Commands(), _Files()
            self.timeouts: list[int] = []
            self.killed = False

        @classmethod
        async def create(cls, **kwargs: Any) -> StandInVM:
            cls.created.append(kwargs)
            if cls.failures:
                raise cls.failures.popleft()
            cls.instances.append(vm := cls())
            return vm

        async def set_timeout(self, timeout: int) -> None:  # noqa: ASYNC109
            self.timeouts.append(timeout)

        async def kill(self) -> bool:
            self.killed = True
            return True

    return StandInVM


async def make(vm_class: Any, **kwargs: Any) -> E2BSandbox:
    limits = kwargs.pop("limits", Limits(wall_s=30))
    spec = SandboxSpec(limits=limits, env=kwargs.pop("env", {}), inputs=kwargs.pop("inputs", {}))
    return await E2BSandbox.create(spec, sandbox_class=vm_class, retry_wait_s=0, **kwargs)


async def test_nonzero_exit_becomes_a_result() -> None:
    vm_class = stand_in()
    async with await make(vm_class) as sbx:
        vm = vm_class.instances[0]
        vm.commands.outcomes.append(e2b.CommandExitException(stderr="boom", stdout="out", exit_code=3, error="x"))
        result = await sbx.run_python("raise SystemExit(3)")
    assert (result.exit_code, result.stdout, result.stderr, result.timed_out) == (3, "out", "boom", False)
    assert vm.files.data["/home/user/runfile.py"] == b"raise SystemExit(3)"
    assert vm.commands.runs[0]["cmd"] == "python3 runfile.py" and vm.commands.runs[0]["timeout"] == 30


async def test_timeout_becomes_a_timed_out_result() -> None:
    vm_class = stand_in()
    async with await make(vm_class) as sbx:
        vm_class.instances[0].commands.outcomes.append(e2b.TimeoutException("Execution timed out"))
        result = await sbx.exec(["sleep", "100"], wall_s=2)
    assert result.timed_out and result.exit_code is None and not result.ok


async def test_a_dead_vm_is_an_infrastructure_error() -> None:
    vm_class = stand_in()
    async with await make(vm_class) as sbx:
        vm_class.instances[0].commands.outcomes.append(e2b.SandboxNotRunningException("gone"))
        with pytest.raises(SandboxCrashed):
            await sbx.exec(["true"])
    assert vm_class.instances[0].killed


async def test_bad_key_is_unavailable_and_not_retried() -> None:
    vm_class = stand_in(e2b.AuthenticationException("invalid API key"))
    assert not issubclass(e2b.AuthenticationException, e2b.SandboxException)
    with pytest.raises(SandboxUnavailable, match="E2B_API_KEY"):
        await make(vm_class)
    assert len(vm_class.created) == 1


async def test_transient_creation_errors_are_retried() -> None:
    vm_class = stand_in(e2b.RateLimitException("slow down"), httpx.ConnectError("reset"))
    async with await make(vm_class) as sbx:
        assert (await sbx.exec(["true"])).ok
    assert len(vm_class.created) == 3
    assert is_transient(e2b.ServiceBusyException("busy")) and not is_transient(e2b.SandboxException("x"))


async def test_retries_give_up_with_unavailable() -> None:
    vm_class = stand_in(*[e2b.RateLimitException("slow down")] * 10)
    with pytest.raises(SandboxUnavailable):
        await make(vm_class)
    assert len(vm_class.created) == 4


async def test_lifetime_follows_the_callers_deadline() -> None:
    vm_class = stand_in()
    with anyio.fail_after(20):
        sbx = await make(vm_class, lifetime_s=3600)
        assert vm_class.created[0]["timeout"] <= 20
        await sbx.exec(["sleep", "1"], wall_s=15)  # would outlive the VM: extended, to the deadline
        assert 15 <= vm_class.instances[0].timeouts[-1] <= 20
        await sbx.close()
    assert vm_class.instances[0].killed


async def test_no_host_environment_and_no_internet_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-host-secret")
    vm_class = stand_in()
    async with await make(vm_class, env={"GIVEN": "1"}):
        pass
    created = vm_class.created[0]
    assert created["envs"] == {"GIVEN": "1"} and created["allow_internet_access"] is False
    assert created["retries"] == 0  # the SDK's hidden retries are off; ours are the only ones


async def test_files_inputs_stdin_and_output_cap(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.csv").write_text("1,2")
    vm_class = stand_in()
    sbx = await make(vm_class, inputs={"input": tmp_path / "data"}, limits=Limits(max_output_bytes=100))
    vm = vm_class.instances[0]
    try:
        assert await sbx.read_file("input/a.csv") == "1,2"
        await sbx.write_file("out/x.txt", "x")
        assert await sbx.list_files() == ["input/", "out/"]
        with pytest.raises(FileNotFoundError):
            await sbx.read_file("nope")
        vm.commands.outcomes.append(e2b.CommandResult(stderr="", stdout="a" * 1000, exit_code=0, error=None))
        result = await sbx.exec(["cat"], stdin=b"hello")
        assert result.truncated and len(result.stdout) < 200
        stdin_file = vm.commands.runs[-1]["cmd"].split("< ")[1]
        assert vm.files.data[stdin_file] == b"hello"
    finally:
        await sbx.close()
    assert vm.killed


async def test_close_kills_even_when_the_body_fails() -> None:
    vm_class = stand_in()
    with pytest.raises(RuntimeError):
        async with await make(vm_class):
            raise RuntimeError("agent loop bug")
    assert vm_class.instances[0].killed


@pytest.mark.e2b_live
@pytest.mark.skipif(
    not (os.environ.get("E2B_API_KEY") and os.environ.get("EXITAGENT_E2B_LIVE") == "1"),
    reason="live E2B needs E2B_API_KEY and EXITAGENT_E2B_LIVE=1",
)
async def test_live_e2b_round_trip() -> None:
    async with open_sandbox("e2b", limits=Limits(wall_s=20)) as sbx:
        ok = await sbx.run_python("print(6 * 7)")
        failed = await sbx.exec(["sh", "-c", "exit 4"])
        slow = await sbx.exec(["sleep", "30"], wall_s=2)
    assert ok.stdout.strip() == "42" and failed.exit_code == 4 and slow.timed_out
