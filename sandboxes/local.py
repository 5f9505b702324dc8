"""The default backend: each command runs in a fresh bubblewrap jail on this machine.

What the code inside gets: no network (``--unshare-all``: a new net namespace has only a downed
``lo``), its own PID namespace (killing ``bwrap`` kills everything in it, ``setsid`` escapees
included), the system directories and this Python's prefix and virtual environment read-only at
their own paths (bound anywhere else the interpreter starts the wrong standard library), the
sandbox's workspace read-write at ``/workspace``, inputs read-only under it, a private ``/tmp``
(the sandbox's ``tmp`` directory, inside the same disk quota as the workspace: ``sandboxes.volume``;
a bounded tmpfs where no quota volume could be mounted), a cleared environment, the unprivileged
uid/gid 65534 with no way to make further user namespaces, and a seccomp filter that makes the
syscalls Python never needs fail with EPERM (``sandboxes.seccomp``). ``/etc``, ``/root``,
``/home``, ``/run`` and the project directory do not exist in there. Resource limits (rlimits,
cgroups, wall clock, output cap) come from ``runner``.

Needs ``bwrap`` (Debian ``bubblewrap``), user namespaces and libseccomp; probed once per process,
with ``SandboxUnavailable`` saying what to do when the probe fails.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

import anyio.to_thread
import structlog

from exitagent.errors import SandboxUnavailable
from sandboxes.base import SandboxSpec
from sandboxes.runner import prlimit_path
from sandboxes.seccomp import filter_bpf
from sandboxes.workspace import HostWorkspaceSandbox

log = structlog.get_logger(__name__)

SANDBOX_WORKDIR = "/workspace"
NOBODY = 65534
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")
# A few harmless files from /etc: command alternatives, the loader cache, the time zone.
_ETC_FILES = ("/etc/alternatives", "/etc/ld.so.cache", "/etc/localtime")
# Some libraries look the current user up (getpass.getuser()); give them one to find.
_PASSWD = f"nobody:x:{NOBODY}:{NOBODY}:nobody:{SANDBOX_WORKDIR}:/usr/sbin/nologin\n"
_GROUP = f"nogroup:x:{NOBODY}:\n"
SECCOMP_FD = 3  # bwrap reads the filter from here; the shell below opens it for each run
_WITH_FILTER = 'exec "$@" 3< "$0"'


def _jail_args() -> list[str]:
    """Namespace and identity flags, then read-only binds of the system and of this Python."""
    args = [
        "--unshare-all", "--unshare-user", "--disable-userns",
        "--die-with-parent", "--new-session", "--hostname", "sandbox",
        "--uid", str(NOBODY), "--gid", str(NOBODY),
        "--proc", "/proc", "--dev", "/dev",
    ]  # fmt: skip
    for path in _SYSTEM_DIRS:
        if os.path.islink(path):  # merged-/usr systems: /bin -> usr/bin
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    for path in _ETC_FILES:
        if os.path.exists(path):
            args += ["--ro-bind", path, path]
    return args


def _python_binds() -> list[str]:
    """This Python's prefix and virtual environment, read-only at their own paths. They go after the
    scratch tmpfs mounts: a checkout under /tmp (CI clones) must not be hidden by the private /tmp."""
    args: list[str] = []
    for prefix in dict.fromkeys([sys.base_prefix, sys.prefix]):
        if prefix != "/usr" and not prefix.startswith("/usr/"):
            args += ["--ro-bind", prefix, prefix]
    return args


@functools.cache
def bwrap_path() -> str:
    found = shutil.which("bwrap") or shutil.which("bwrap", path="/usr/bin:/usr/local/bin")
    if found is None:
        raise SandboxUnavailable(
            "bubblewrap is not installed: `apt-get install bubblewrap` (or opt in to the unisolated "
            "backend with EXITAGENT_SANDBOX=process)"
        )
    return found


@functools.cache
def probe(bwrap: str) -> str | None:
    """Start the real jail once with ``python -c pass``, filter included: None if it works, else
    what to do."""
    try:
        prlimit_path()
        program = filter_bpf()
    except SandboxUnavailable as err:
        return str(err)
    jail = [*_jail_args(), *_python_binds(), "--seccomp", str(SECCOMP_FD), "--", sys.executable, "-c", "pass"]
    try:
        with tempfile.NamedTemporaryFile(prefix="exitagent-seccomp-") as rules:
            rules.write(program)
            rules.flush()
            argv = ["/bin/sh", "-c", _WITH_FILTER, rules.name, bwrap, *jail]
            done = subprocess.run(argv, capture_output=True, env={}, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"bubblewrap probe could not run: {err}"
    if done.returncode != 0:
        said = done.stderr.decode(errors="replace").strip()[-500:]
        return (
            f"bubblewrap refused to start a sandbox ({said or f'exit {done.returncode}'}); the host "
            "may block user namespaces (sysctl kernel.unprivileged_userns_clone / AppArmor). Fix "
            "that, or opt in to the unisolated backend with EXITAGENT_SANDBOX=process"
        )
    return None


async def check_bwrap() -> None:
    """Raise SandboxUnavailable unless bubblewrap works here; the probe runs once per process."""
    failure = await anyio.to_thread.run_sync(probe, bwrap_path())
    if failure is not None:
        log.error("sandbox_probe_failed", backend="local", reason=failure)
        raise SandboxUnavailable(failure)
    filter_bpf()


class LocalSandbox(HostWorkspaceSandbox):
    """A bubblewrap sandbox; see the module docstring for what the code inside can see."""

    backend = "local"

    def __init__(self, spec: SandboxSpec, root: Path, *, volume: bool = False) -> None:
        super().__init__(spec, root, volume=volume)
        self.workdir = SANDBOX_WORKDIR

    @classmethod
    async def _check_runtime(cls) -> None:
        await check_bwrap()

    def _prepare_inputs(self) -> None:
        (self.root / "passwd").write_text(_PASSWD)
        (self.root / "group").write_text(_GROUP)
        (self.root / "seccomp.bpf").write_bytes(filter_bpf())
        # Mount points made now, so listings look the same before the first run as after it.
        for rel, host in self.spec.inputs.items():
            point = self.host_workspace / rel
            point.parent.mkdir(parents=True, exist_ok=True)
            if host.is_dir():
                point.mkdir(exist_ok=True)
            else:
                point.touch()

    def _tmp_dir(self) -> str:
        return "/tmp"

    def _command(self, argv: Sequence[str], cwd: PurePosixPath, env: Mapping[str, str]) -> list[str]:
        args = ["/bin/sh", "-c", _WITH_FILTER, str(self.root / "seccomp.bpf"), bwrap_path(), *_jail_args()]
        # bounded scratch; bwrap's own /dev/shm would be RAM-sized
        args += ["--perms", "1777", "--size", str(self.limits.tmp_bytes), "--tmpfs", "/dev/shm"]
        if self.volume:  # /tmp shares the quota of the workspace
            args += ["--bind", str(self.root / "tmp"), "/tmp"]
        else:
            args += ["--perms", "1777", "--size", str(self.limits.tmp_bytes), "--tmpfs", "/tmp"]
        args += _python_binds()
        args += ["--ro-bind", str(self.root / "passwd"), "/etc/passwd"]
        args += ["--ro-bind", str(self.root / "group"), "/etc/group"]
        args += ["--bind", str(self.host_workspace), SANDBOX_WORKDIR]
        for rel, host in self.spec.inputs.items():
            args += ["--ro-bind", str(host), f"{SANDBOX_WORKDIR}/{rel}"]
        # bwrap's root and /dev are unbounded tmpfs: read-only, or they are RAM to fill. (Device
        # nodes stay writable on a read-only mount.) Submounts such as /tmp are not affected.
        args += ["--remount-ro", "/", "--remount-ro", "/dev", "--clearenv", "--seccomp", str(SECCOMP_FD)]
        args += ["--chdir", str(PurePosixPath(SANDBOX_WORKDIR) / cwd)]
        for key, value in env.items():
            args += ["--setenv", key, value]
        return [*args, "--", *argv]
