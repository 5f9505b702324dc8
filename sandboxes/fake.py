"""An in-process ``Sandbox`` for other parts' unit tests: scripted results, files in a dict.

Nothing runs. Each ``exec``/``run_python`` is recorded in ``calls`` and answered by ``respond``
when given, else by the next of ``results``, else by an empty successful result::

    sbx = FakeSandbox(results=[ExecResult("42\\n", "", 0)])
    assert (await sbx.run_python("print(42)")).stdout == "42\\n"
    assert sbx.files["runfile.py"] == b"print(42)"
"""

from __future__ import annotations

import errno
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from types import TracebackType
from typing import Self

from exitagent.errors import SandboxError
from sandboxes.base import ExecResult, SandboxSpec, workspace_path


@dataclass(frozen=True)
class FakeCall:
    """One command the fake was asked to run."""

    cmd: tuple[str, ...]
    cwd: str
    env: Mapping[str, str]
    stdin: bytes | None
    wall_s: float | None


class FakeSandbox:
    """Implements ``Sandbox`` in memory. ``files`` maps workspace paths to bytes."""

    backend = "fake"
    workdir = "/workspace"
    python = "python"

    def __init__(
        self,
        spec: SandboxSpec | None = None,
        *,
        results: Iterable[ExecResult] = (),
        respond: Callable[[FakeCall, FakeSandbox], ExecResult] | None = None,
        files: Mapping[str, str | bytes] | None = None,
    ) -> None:
        self.spec = spec or SandboxSpec()
        self.limits = self.spec.limits
        self.results = deque(results)
        self.respond = respond
        self.files: dict[str, bytes] = {}
        self.calls: list[FakeCall] = []
        self.closed = False
        for path, data in (files or {}).items():
            self.files[self._key(path)] = data.encode() if isinstance(data, str) else data
        for rel, host in self.spec.inputs.items():
            sources = [host] if host.is_file() else sorted(p for p in host.rglob("*") if p.is_file())
            for source in sources:
                inside = PurePosixPath(rel) / source.relative_to(host) if source != host else rel
                self.files[self._key(str(inside))] = source.read_bytes()

    @staticmethod
    def _key(path: str) -> str:
        return str(workspace_path(path))

    async def exec(
        self,
        cmd: Sequence[str],
        *,
        wall_s: float | None = None,
        cwd: str = ".",
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
    ) -> ExecResult:
        self._check_open()
        call = FakeCall(tuple(cmd), cwd, dict(env or {}), stdin, wall_s)
        self.calls.append(call)
        if self.respond is not None:
            return self.respond(call, self)
        if self.results:
            return self.results.popleft()
        return ExecResult(stdout="", stderr="", exit_code=0)

    async def run_python(self, code: str, *, wall_s: float | None = None, filename: str = "runfile.py") -> ExecResult:
        await self.write_file(filename, code)
        return await self.exec([self.python, filename], wall_s=wall_s)

    async def write_file(self, path: str, data: str | bytes) -> None:
        self._check_open()
        self.files[self._key(path)] = data.encode() if isinstance(data, str) else bytes(data)

    async def read_file(self, path: str, *, binary: bool = False, max_bytes: int = 16 << 20) -> str | bytes:
        self._check_open()
        key = self._key(path)
        if key not in self.files:
            if any(name.startswith(key + "/") for name in self.files):
                raise IsADirectoryError(path)
            raise FileNotFoundError(path)
        data = self.files[key]
        if len(data) > max_bytes:
            raise OSError(errno.EFBIG, f"{path} is larger than {max_bytes} bytes")
        return data if binary else data.decode(errors="replace")

    async def list_files(self, path: str = ".") -> list[str]:
        self._check_open()
        base = workspace_path(path)
        names = set()
        for key in self.files:
            inside = PurePosixPath(key)
            if base.parts:
                if inside == base or not inside.is_relative_to(base):
                    continue
                inside = inside.relative_to(base)
            names.add(inside.parts[0] + ("/" if len(inside.parts) > 1 else ""))
        if base.parts and not names:
            raise FileNotFoundError(path)
        return sorted(names)

    def _check_open(self) -> None:
        if self.closed:
            raise SandboxError("fake sandbox is closed")

    async def close(self) -> None:
        self.closed = True

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
