"""Per-run cgroups (v1): the process cap that stops fork bombs, and the memory cap that tells us a
run was OOM-killed.

RLIMIT_NPROC does nothing when the host user is root (dev and CI are), so a ``pids`` cgroup is the
only reliable fork-bomb guard; a ``memory`` cgroup's ``oom_kill`` counter is the only reliable way
to say "out of memory" rather than "killed by a signal". Runs get leaves under the cgroups this
process already sits in (so any limit placed on us still applies), joined by the launcher before it
execs the sandbox, emptied after the run, reused by the sandbox's next run and removed on close.

Where the hierarchy is missing or read-only (cgroup v2-only hosts, unprivileged users) the leaves
are skipped with one logged warning per controller: the run still has its wall clock and rlimits.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import uuid
from dataclasses import dataclass
from pathlib import Path

import anyio
import structlog

log = structlog.get_logger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("pids", "memory")
_KILL_ROUNDS = 1000  # a capped fork bomb refills freed slots; each round kills what it sees


@functools.cache
def usable_parent(controller: str) -> Path | None:
    """The v1 cgroup directory this process is in for ``controller``, if we may make leaves there."""
    own = _own_cgroup_path(controller)
    parent = CGROUP_ROOT / controller / own.lstrip("/") if own is not None else None
    reason = "not mounted as cgroup v1" if parent is None or not parent.is_dir() else None
    if reason is None and parent is not None:
        probe = parent / f"exitagent-probe-{os.getpid()}"
        try:
            probe.mkdir()
            probe.rmdir()
        except OSError as err:
            reason = f"cannot create a child cgroup: {err.strerror}"
    if reason is not None:
        what = "fork-bomb protection" if controller == "pids" else "memory cap and OOM detection"
        log.warning("sandbox_cgroup_unavailable", controller=controller, reason=reason, lost=what)
        return None
    return parent


def _own_cgroup_path(controller: str) -> str | None:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, names, path = line.split(":", 2)
        if controller in names.split(","):
            return path
    return None


_UNLIMITED = {"pids.max": "max", "memory.limit_in_bytes": "-1", "memory.memsw.limit_in_bytes": "-1"}


@dataclass
class RunCgroup:
    """Leaves (one per usable controller) that hold one run at a time. ``procs_files`` are what
    the launcher writes its pid into."""

    leaves: dict[str, Path]
    limits_memory: bool = False  # the current run has a memory cap here (so OOM is detectable)
    _oom_base: int = 0

    @classmethod
    def create(cls) -> RunCgroup:
        name = f"exitagent-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        cgroup = cls({})
        try:
            for controller in CONTROLLERS:
                parent = usable_parent(controller)
                if parent is not None:
                    (parent / name).mkdir()
                    cgroup.leaves[controller] = parent / name
        except OSError:
            cgroup.remove_now()
            raise
        return cgroup

    def configure(self, max_processes: int | None, memory_bytes: int | None) -> None:
        """Set this run's caps; ``None`` lifts one. Raises OSError if the kernel refuses."""
        memory = "-1" if memory_bytes is None else str(memory_bytes)
        knobs = [("pids", "pids.max", "max" if max_processes is None else str(max_processes))]
        # memsw (memory+swap, so a host with swap cannot page the run out instead of stopping it)
        # must stay >= the memory cap at every step: lift it, set the cap, then lower it to match.
        knobs += [
            ("memory", "memory.memsw.limit_in_bytes", "-1"),
            ("memory", "memory.limit_in_bytes", memory),
            ("memory", "memory.memsw.limit_in_bytes", memory),
        ]
        for controller, knob, value in knobs:
            leaf = self.leaves.get(controller)
            if leaf is not None and (leaf / knob).exists():
                (leaf / knob).write_text(value)
        self.limits_memory = "memory" in self.leaves and memory_bytes is not None
        self._oom_base = self._oom_count()

    @property
    def procs_files(self) -> list[str]:
        return [str(leaf / "cgroup.procs") for leaf in self.leaves.values()]

    def members(self) -> set[int]:
        pids: set[int] = set()
        for leaf in self.leaves.values():
            try:
                pids.update(int(p) for p in (leaf / "cgroup.procs").read_text().split())
            except OSError:
                continue
        return pids

    def kill_all(self) -> None:
        """SIGKILL every member until none is left (a fork bomb refills the gaps for a while)."""
        for _ in range(_KILL_ROUNDS):
            members = self.members()
            if not members:
                return
            for pid in members:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        log.warning("sandbox_cgroup_not_emptied", leaves=[str(p) for p in self.leaves.values()])

    async def empty(self) -> bool:
        """Kill what is left and wait for it to go (SIGKILLed tasks take a moment to leave)."""
        for _ in range(200):
            self.kill_all()
            if not self.members():
                return True
            await anyio.sleep(0.005)
        return False

    def oom_killed(self) -> bool:
        return self.limits_memory and self._oom_count() > self._oom_base

    def _oom_count(self) -> int:
        leaf = self.leaves.get("memory")
        if leaf is None:
            return 0
        try:
            for line in (leaf / "memory.oom_control").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
            # Kernels before 4.13 have no oom_kill counter; hitting the cap is the next best sign.
            return int((leaf / "memory.failcnt").read_text())
        except (OSError, ValueError):
            return 0

    def remove_now(self) -> bool:
        """Try once to remove the leaves; ``False`` while a dying member still holds one."""
        for controller, leaf in list(self.leaves.items()):
            try:
                leaf.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                continue
            del self.leaves[controller]
        return not self.leaves


class CgroupPool:
    """Leaves for one sandbox, reused run after run: making and removing a memory cgroup costs
    about 10 ms a run here, reusing one costs a few writes. Concurrent runs get separate leaves, so
    a run's sweep never kills another run's processes. ``close`` removes them all."""

    def __init__(self) -> None:
        self._free: list[RunCgroup] = []
        self._all: list[RunCgroup] = []

    async def take(self, max_processes: int | None, memory_bytes: int | None) -> RunCgroup:
        cgroup = self._free.pop() if self._free else None
        if cgroup is None:
            cgroup = RunCgroup.create()
            self._all.append(cgroup)
        cgroup.configure(max_processes, memory_bytes)
        return cgroup

    async def give_back(self, cgroup: RunCgroup) -> None:
        if await cgroup.empty():
            self._free.append(cgroup)
        else:  # something will not die: never reuse it, let close() try again
            log.warning("sandbox_cgroup_not_emptied", leaves=[str(p) for p in cgroup.leaves.values()])

    async def close(self) -> None:
        for cgroup in self._all:
            if not (await cgroup.empty() and cgroup.remove_now()):
                log.warning("sandbox_cgroup_leaked", leaves=[str(p) for p in cgroup.leaves.values()])
        self._all.clear()
        self._free.clear()
