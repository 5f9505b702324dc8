"""Sandboxes whose workspace is a host directory: the shared body of ``local`` and ``process``.

A subclass says how a command is wrapped (``_command``) and what the code sees as its workspace
path and PATH. Everything else is here: the per-sandbox directory (a size-limited volume when
``Limits.disk_bytes`` is set and the host allows it, see ``sandboxes.volume``), read-only inputs,
the refusal to run without cgroups (``sandboxes.cgroups.require_cgroups``), and file access from
the host side.

The host reads and writes files the sandboxed code could have tampered with, so every host-side
file operation resolves symlinks and refuses anything that lands outside the workspace (or the
input it names), opens with ``O_NOFOLLOW | O_NONBLOCK`` (a planted FIFO must not hang us) and
accepts regular files only. Don't run a file operation while a command runs in the same sandbox:
the checks are made before the open, not atomically with it.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import ClassVar, Self

import anyio
import anyio.to_thread
import structlog

from exitagent.errors import SandboxError
from sandboxes.base import ExecResult, SandboxSpec, sandbox_env, workspace_path
from sandboxes.cgroups import CgroupPool, current_hierarchy, require_cgroups
from sandboxes.runner import run_limited
from sandboxes.volume import mount_volume, reclaim_orphaned_volumes, unmount_volume, volume_name_prefix

log = structlog.get_logger(__name__)


class HostWorkspaceSandbox:
    """Holds ``<root>/workspace`` (the code's working directory) and ``<root>/tmp``."""

    backend: ClassVar[str] = ""

    def __init__(self, spec: SandboxSpec, root: Path, *, volume: bool = False) -> None:
        self.spec, self.limits = spec, spec.limits
        self.root = root
        self.volume = volume  # root is a tmpfs of limits.disk_bytes: the quota covers /tmp too
        self.host_workspace = root / "workspace"
        self.workdir = str(self.host_workspace)  # subclasses that remap it override this
        self.python = sys.executable  # the project's interpreter, with its packages
        self._cgroups = CgroupPool()
        self._closed = False

    @classmethod
    async def create(cls, spec: SandboxSpec, *, base_dir: str | Path | None = None) -> Self:
        """Make the directories (under ``base_dir``, default the system temp dir) and the inputs."""
        await cls._check_runtime()
        require_cgroups(current_hierarchy())
        disk = spec.limits.disk_bytes
        if disk is not None:
            await anyio.to_thread.run_sync(reclaim_orphaned_volumes, base_dir or tempfile.gettempdir())
        root = Path(tempfile.mkdtemp(prefix=volume_name_prefix(cls.backend), dir=base_dir))
        sandbox = cls(spec, root, volume=disk is not None and mount_volume(root, disk))
        try:
            (root / "workspace").mkdir()
            (root / "tmp").mkdir()
            os.chmod(root / "tmp", 0o1777)  # mkdir's mode is masked by the umask
            sandbox._prepare_inputs()
        except OSError as err:
            await sandbox._remove()
            raise SandboxError(f"could not prepare sandbox inputs in {root}: {err}") from err
        log.info("sandbox_opened", backend=cls.backend, root=str(root), inputs=sorted(spec.inputs),
                 disk_quota=disk if sandbox.volume else None)
        return sandbox

    @classmethod
    async def _check_runtime(cls) -> None:
        """Raise SandboxUnavailable when the backend cannot run here."""

    def _prepare_inputs(self) -> None:
        """Make each input visible at its workspace path (subclasses decide how)."""

    def _command(self, argv: Sequence[str], cwd: PurePosixPath, env: Mapping[str, str]) -> list[str]:
        raise NotImplementedError

    def _path_dirs(self) -> list[str]:
        return [str(Path(sys.prefix) / "bin"), "/usr/local/bin", "/usr/bin", "/bin"]

    def _tmp_dir(self) -> str:
        return str(self.root / "tmp")

    # --- running -----------------------------------------------------------------------------

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
        rel_cwd = workspace_path(cwd)
        host_cwd, _ = self._resolve(cwd)
        if not host_cwd.is_dir():
            raise FileNotFoundError(f"no directory {cwd!r} in the sandbox workspace")
        full_env = sandbox_env(self.workdir, self._path_dirs(), {"TMPDIR": self._tmp_dir()})
        full_env.update(self.spec.env)
        full_env.update(env or {})
        argv = self._command(list(cmd), rel_cwd, full_env)
        return await run_limited(
            argv,
            cwd=host_cwd,
            env=full_env,
            limits=self.limits,
            cgroups=self._cgroups,
            wall_s=wall_s,
            stdin=stdin,
        )

    async def run_python(self, code: str, *, wall_s: float | None = None, filename: str = "runfile.py") -> ExecResult:
        await self.write_file(filename, code)
        return await self.exec([self.python, filename], wall_s=wall_s)

    # --- files -------------------------------------------------------------------------------

    async def write_file(self, path: str, data: str | bytes) -> None:
        self._check_open()
        host, read_only = self._resolve(path)
        if read_only:
            raise PermissionError(f"{path!r} is a read-only sandbox input")
        payload = data.encode() if isinstance(data, str) else bytes(data)
        await anyio.to_thread.run_sync(_write_inside, host, self.host_workspace, payload)

    async def read_file(self, path: str, *, binary: bool = False, max_bytes: int = 16 << 20) -> str | bytes:
        self._check_open()
        host, _ = self._resolve(path)
        data = await anyio.to_thread.run_sync(_read_inside, host, self._root_of(path), max_bytes)
        return data if binary else data.decode(errors="replace")

    async def list_files(self, path: str = ".") -> list[str]:
        self._check_open()
        host, _ = self._resolve(path)
        _check_inside(host, self._root_of(path))
        if not host.is_dir():
            raise NotADirectoryError(f"{path!r} is not a directory in the sandbox workspace")
        here = workspace_path(path)
        names = []
        for entry in os.scandir(host):
            input_dir = str(here / entry.name) in self.spec.inputs and entry.is_dir()
            names.append(entry.name + ("/" if input_dir or entry.is_dir(follow_symlinks=False) else ""))
        return sorted(names)

    def _resolve(self, path: str) -> tuple[Path, bool]:
        """Host path for a workspace path, and whether it lies in a read-only input."""
        rel = workspace_path(path)
        for key, host in self.spec.inputs.items():
            mount = PurePosixPath(key)
            if rel == mount or mount in rel.parents:
                return Path(host).joinpath(*rel.parts[len(mount.parts) :]), True
        return self.host_workspace.joinpath(*rel.parts), False

    def _root_of(self, path: str) -> Path:
        rel = workspace_path(path)
        for key, host in self.spec.inputs.items():
            if rel == PurePosixPath(key) or PurePosixPath(key) in rel.parents:
                return Path(host)
        return self.host_workspace

    # --- lifetime ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise SandboxError(f"{self.backend} sandbox at {self.root} is closed")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._cgroups.close()
        await self._remove()
        if self.root.exists():
            log.warning("sandbox_workdir_leaked", backend=self.backend, root=str(self.root))
        else:
            log.info("sandbox_closed", backend=self.backend, root=str(self.root))

    async def _remove(self) -> None:
        if self.volume:
            await anyio.to_thread.run_sync(unmount_volume, self.root)
            self.volume = False
        await anyio.to_thread.run_sync(shutil.rmtree, self.root, True)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with anyio.CancelScope(shield=True):
            await self.close()


def _check_inside(path: Path, root: Path) -> None:
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    if real != real_root and not real.startswith(real_root + os.sep):
        raise PermissionError(f"{path} resolves outside the sandbox workspace")


def _open_regular(path: Path, flags: int) -> int:
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENXIO):
            raise PermissionError(f"{path.name} is a link or a pipe; refusing to follow it") from err
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(f"{path.name} is a directory")
        raise PermissionError(f"{path.name} is not a regular file")
    return fd


def _read_inside(path: Path, root: Path, max_bytes: int) -> bytes:
    _check_inside(path.parent, root)
    with os.fdopen(_open_regular(path, os.O_RDONLY), "rb") as file:
        data = file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise OSError(errno.EFBIG, f"{path.name} is larger than {max_bytes} bytes")
    return data


def _write_inside(path: Path, root: Path, data: bytes) -> None:
    # realpath resolves what exists and appends the rest, so a planted link is caught before mkdir.
    _check_inside(path.parent, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    with os.fdopen(_open_regular(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "wb") as file:
        file.write(data)
