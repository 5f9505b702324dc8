"""Run one command under limits and always come back with an ``ExecResult``.

Shared by ``local`` (which hands in a bubblewrap command line) and ``process`` (which hands in the
bare command). The child is started through a tiny launcher, ``/bin/sh`` then util-linux
``prlimit``, because anyio's ``open_process`` has no ``preexec_fn``: the shell joins the run's
cgroups *before* it execs anything, so no process of the run is ever outside them, and prlimit sets
the rlimits the whole tree inherits. Both cost about a millisecond.

The process tree is killed when the wall clock runs out, when the caller is cancelled, and after a
normal exit too (a daemon left behind is a leak): SIGKILL to the launcher's process group, then to
every member of the pids cgroup. Under bubblewrap killing the outer ``bwrap`` already tears down
the PID namespace; the cgroup sweep is what catches ``setsid`` escapees of the ``process`` backend.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import anyio
import anyio.abc
import structlog
from anyio.lowlevel import RunVar

from exitagent.errors import SandboxCrashed, SandboxUnavailable
from sandboxes.base import ExecResult, Limits
from sandboxes.cgroups import CgroupPool, RunCgroup

log = structlog.get_logger(__name__)

LAUNCHER_FAILED = 125  # the launcher's own exit code when it could not join a cgroup
# $0 is a per-run mark, so code in the sandbox cannot fake a launcher failure by printing it.
_LAUNCHER = (
    'while [ "$1" != -- ]; do echo $$ > "$1" || { echo "$0: cannot join $1" >&2; '
    f'exit {LAUNCHER_FAILED}; }}; shift; done; shift; exec "$@"'
)
_PIPE_GRACE_S = 1.0  # how long output may keep flowing after the tree is dead (it should not)
_RUNS: RunVar[anyio.CapacityLimiter] = RunVar("exitagent_sandbox_runs")


def run_limiter() -> anyio.CapacityLimiter:
    """One limiter per event loop, sized to the cores: sandboxed runs are CPU-bound and several
    agent loops share a small machine."""
    try:
        return _RUNS.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(os.cpu_count() or 1)
        _RUNS.set(limiter)
        return limiter


def prlimit_path() -> str:
    found = shutil.which("prlimit", path="/usr/bin:/bin:/usr/local/bin")
    if found is None:
        raise SandboxUnavailable("util-linux 'prlimit' not found; install util-linux to run sandboxes")
    return found


def launcher_argv(argv: Sequence[str], limits: Limits, cgroup: RunCgroup, mark: str) -> list[str]:
    """``sh`` joins the cgroups, ``prlimit`` sets the rlimits, then ``argv`` runs in their place."""
    rlimits = ["--core=0", f"--nofile={limits.max_open_files}"]
    if limits.cpu_s is not None:
        soft = max(1, math.ceil(limits.cpu_s))
        rlimits.append(f"--cpu={soft}:{soft + 1}")  # SIGXCPU first, SIGKILL a second later
    if limits.max_file_bytes is not None:
        rlimits.append(f"--fsize={limits.max_file_bytes}")
    # RLIMIT_DATA only where there is no memory cgroup: the cgroup counts the whole tree and lets
    # us report OOM; RLIMIT_DATA is per process. (Not RLIMIT_AS: it breaks big address reservations.)
    if limits.memory_bytes is not None and not cgroup.limits_memory:
        rlimits.append(f"--data={limits.memory_bytes}")
    joins = cgroup.procs_files
    return ["/bin/sh", "-c", _LAUNCHER, mark, *joins, "--", prlimit_path(), *rlimits, "--", *argv]


class _Capture:
    """Keep the first and last halves of ``cap`` bytes of a stream, and count what was dropped."""

    def __init__(self, cap: int) -> None:
        self.head_cap, self.tail_cap = cap // 2, cap - cap // 2
        self.head, self.tail = bytearray(), bytearray()
        self.total = 0

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        room = self.head_cap - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            if len(self.tail) > self.tail_cap:
                del self.tail[: len(self.tail) - self.tail_cap]

    @property
    def truncated(self) -> bool:
        return self.total > len(self.head) + len(self.tail)

    def text(self) -> str:
        head, tail = self.head.decode(errors="replace"), self.tail.decode(errors="replace")
        if not self.truncated:
            return (self.head + self.tail).decode(errors="replace")
        dropped = self.total - len(self.head) - len(self.tail)
        return f"{head}\n[... {dropped} bytes of output cut ...]\n{tail}"


def capped_text(text: str, cap: int) -> tuple[str, bool]:
    """Apply the same head-and-tail cap to output that arrived in one piece (E2B, fakes)."""
    capture = _Capture(cap)
    capture.feed(text.encode())
    return capture.text(), capture.truncated


async def _pump(stream: anyio.abc.ByteReceiveStream | None, capture: _Capture) -> None:
    if stream is None:
        return
    async for chunk in stream:
        capture.feed(chunk)


async def _feed(stream: anyio.abc.ByteSendStream | None, data: bytes) -> None:
    if stream is None:
        return
    try:
        await stream.send(data)
        await stream.aclose()
    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass  # the code did not read its stdin; that is its business


def kill_tree(process: anyio.abc.Process, cgroup: RunCgroup) -> None:
    """SIGKILL the launcher's process group, then everything left in the run's cgroups."""
    # start_new_session made the launcher a group leader. A live group pins its id, so this
    # cannot hit an unrelated group unless ours is already empty and the id was just reused.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    cgroup.kill_all()


async def run_limited(
    argv: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    limits: Limits,
    cgroups: CgroupPool,
    wall_s: float | None = None,
    stdin: bytes | None = None,
) -> ExecResult:
    """Run ``argv`` to completion or to its wall clock, whichever first, with the tree reaped.
    ``cgroups`` is the calling sandbox's pool of run cgroups."""
    wall_s = wall_s if wall_s is not None else limits.wall_s
    async with run_limiter():
        try:
            cgroup = await cgroups.take(limits.max_processes, limits.memory_bytes)
        except OSError as err:
            raise SandboxCrashed(f"could not set up the run's cgroup: {err}") from err
        try:
            return await _run_in(argv, cgroup, cwd=cwd, env=env, limits=limits, wall_s=wall_s, stdin=stdin)
        finally:
            with anyio.CancelScope(shield=True):
                await cgroups.give_back(cgroup)


async def _run_in(
    argv: Sequence[str],
    cgroup: RunCgroup,
    *,
    cwd: Path,
    env: Mapping[str, str],
    limits: Limits,
    wall_s: float,
    stdin: bytes | None,
) -> ExecResult:
    out, err = _Capture(limits.max_output_bytes), _Capture(limits.max_output_bytes)
    mark = f"exitagent-launcher-{uuid.uuid4().hex}"
    started = time.monotonic()
    try:
        process = await anyio.open_process(
            launcher_argv(argv, limits, cgroup, mark),
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            cwd=cwd,
            env=dict(env),
            start_new_session=True,  # its own group and session: no tty, one killpg for the tree
        )
    except OSError as error:
        raise SandboxCrashed(f"could not start the sandboxed process: {error}") from error
    try:
        async with anyio.create_task_group() as pumps:
            pumps.start_soon(_pump, process.stdout, out)
            pumps.start_soon(_pump, process.stderr, err)
            if stdin is not None:
                pumps.start_soon(_feed, process.stdin, stdin)
            with anyio.move_on_after(wall_s) as clock:
                await process.wait()
            kill_tree(process, cgroup)
            await process.wait()
            # Pipes close once the tree is dead; the deadline only guards against a process that
            # escaped both the group and the cgroup (no cgroups on this host) and holds them open.
            pumps.cancel_scope.deadline = anyio.current_time() + _PIPE_GRACE_S
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:  # cancelled from outside before the kill above
                kill_tree(process, cgroup)
            cgroup.kill_all()
            await process.aclose()
    return _result(process.returncode, out, err, clock.cancelled_caught, cgroup, started, mark)


def _result(
    returncode: int | None,
    out: _Capture,
    err: _Capture,
    timed_out: bool,
    cgroup: RunCgroup,
    started: float,
    mark: str,
) -> ExecResult:
    stderr = err.text()
    if returncode == LAUNCHER_FAILED and stderr.startswith(mark):
        raise SandboxCrashed(f"sandbox launcher failed: {stderr.strip()}")
    exit_code = None if timed_out or returncode is None else returncode
    if exit_code is not None and exit_code < 0:
        exit_code = 128 - exit_code  # killed by a signal: report it the way bwrap and shells do
    oom = cgroup.oom_killed()
    if not cgroup.limits_memory and exit_code not in (0, None):
        # Without a memory cgroup RLIMIT_DATA makes allocations fail; Python says so last.
        oom = "MemoryError" in err.text()[-2000:]
    return ExecResult(
        stdout=out.text(),
        stderr=stderr,
        exit_code=exit_code,
        timed_out=timed_out,
        out_of_memory=oom,
        truncated=out.truncated or err.truncated,
        duration_s=time.monotonic() - started,
    )
