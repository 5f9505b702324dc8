"""The sandbox seam: where model-written code runs, and what comes back.

Threat model: everything run through a ``Sandbox`` is hostile. It may try to reach the network, read
host secrets, fork-bomb, eat memory or disk, loop forever, flood its output, or leave a daemon
behind, or make syscalls that attack the kernel. The default backend (``local``, bubblewrap with a
seccomp filter) stops all of that; ``process`` only bounds resources and must be asked for by
name; ``e2b`` runs in E2B's cloud VMs. The host backends refuse to start where no cgroup can cap
processes and memory, unless ``EXITAGENT_SANDBOX_ALLOW_NO_CGROUPS=1`` (``sandboxes.cgroups``).

Model mistakes are data: a non-zero exit, a timeout, running out of memory or flooding the output
all come back as an ``ExecResult``. Only the infrastructure raises (``exitagent.errors``):
``SandboxUnavailable`` when a runtime is missing or refused, ``SandboxCrashed`` when it dies under
us. File operations raise the usual ``FileNotFoundError`` / ``IsADirectoryError`` /
``PermissionError`` (a path that leaves the workspace) so a tool layer can show them to the model.

Paths given to a sandbox are relative to its workspace (``Sandbox.workdir`` inside it)::

    async with open_sandbox(limits=Limits(wall_s=10), inputs={"data": Path("task/data")}) as sbx:
        await sbx.write_file("solution.py", code)
        result = await sbx.run_python("import solution; print(solution.answer())")

``open_sandbox`` and the backend choice live in ``sandboxes.factory``: this contract file names no
backend, so the backends can import it without a cycle.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

import structlog

from exitagent.errors import ConfigError

log = structlog.get_logger(__name__)



@dataclass(frozen=True)
class Limits:
    """Resource limits for each command run in a sandbox. ``None`` means no limit of that kind."""

    wall_s: float = 60.0  # whole process tree, killed when it runs out
    cpu_s: float | None = None  # per process (RLIMIT_CPU); the wall limit is the real bound
    memory_bytes: int | None = 2 << 30  # memory cgroup where usable, else RLIMIT_DATA
    max_processes: int | None = 64  # pids cgroup: RLIMIT_NPROC does nothing for root
    max_file_bytes: int | None = 1 << 30  # RLIMIT_FSIZE: largest single file written
    max_output_bytes: int = 1 << 20  # per stream; the head and tail are kept
    disk_bytes: int | None = 1 << 30  # total of the workspace and /tmp (a tmpfs volume: RAM)
    tmp_bytes: int = 512 << 20  # /dev/shm (local backend), and /tmp where no volume can be mounted
    max_open_files: int = 1024

    def __post_init__(self) -> None:
        if self.wall_s <= 0 or self.max_output_bytes < 2 or (self.disk_bytes is not None and self.disk_bytes < 1 << 20):
            raise ConfigError(f"limits must be positive: {self}")


@dataclass(frozen=True)
class ExecResult:
    """What one command did. ``exit_code`` follows the shell: 128+N when killed by signal N, and
    ``None`` when the sandbox killed it for running past ``wall_s``."""

    stdout: str
    stderr: str
    exit_code: int | None
    timed_out: bool = False
    out_of_memory: bool = False
    truncated: bool = False  # stdout or stderr went over max_output_bytes; the middle is cut
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and not self.out_of_memory


@dataclass(frozen=True)
class SandboxSpec:
    """How to make a sandbox. ``inputs`` maps a workspace-relative path to a host path, mounted
    read-only (local), linked (process) or uploaded (e2b). ``env`` is the only environment the code
    sees beyond a minimal PATH/HOME/thread set: the host's environment never goes in."""

    limits: Limits = field(default_factory=Limits)
    inputs: Mapping[str, Path] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for rel, host in self.inputs.items():
            workspace_path(rel)
            if not Path(host).exists():
                raise ConfigError(f"sandbox input {rel!r} -> {host}: host path does not exist")


@runtime_checkable
class Sandbox(Protocol):
    """One live environment with a workspace. Commands in it run one fresh process tree each."""

    workdir: str  # the workspace's absolute path as code inside sees it
    limits: Limits

    async def exec(
        self,
        cmd: Sequence[str],
        *,
        wall_s: float | None = None,
        cwd: str = ".",
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
    ) -> ExecResult: ...

    async def run_python(self, code: str, *, wall_s: float | None = None, filename: str = "runfile.py") -> ExecResult:
        """Write ``code`` to ``filename`` in the workspace and run it in a fresh interpreter."""
        ...

    async def write_file(self, path: str, data: str | bytes) -> None:
        """Create or replace a workspace file, making parent directories."""
        ...

    async def read_file(self, path: str, *, binary: bool = False, max_bytes: int = 16 << 20) -> str | bytes:
        """Read a workspace or input file; ``OSError(EFBIG)`` when it is over ``max_bytes``."""
        ...

    async def list_files(self, path: str = ".") -> list[str]:
        """Sorted entry names in a workspace directory; directories end with ``/``."""
        ...

    async def close(self) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


def workspace_path(path: str) -> PurePosixPath:
    """Normalise a workspace-relative path, refusing absolute paths and ``..`` (PermissionError)."""
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts:
        raise PermissionError(f"{path!r}: sandbox paths are relative to the workspace, without '..'")
    return pure


def sandbox_env(home: str, path_dirs: Sequence[str], extra: Mapping[str, str]) -> dict[str, str]:
    """The whole environment for sandboxed code: nothing from the host, one thread per library
    (the machines are small and several sandboxes share them), then the caller's additions."""
    env = {
        "PATH": ":".join(path_dirs),
        "HOME": home,
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    env.update(extra)
    return env
