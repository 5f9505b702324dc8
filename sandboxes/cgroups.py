"""Per-run cgroups (v1): the process cap that stops fork bombs, and the memory cap that tells us a
run was OOM-killed.

RLIMIT_NPROC does nothing when the host user is root (dev and CI are), so a ``pids`` cgroup is the
only reliable fork-bomb guard; a ``memory`` cgroup's ``oom_kill`` counter is the only reliable way
to say "out of memory" rather than "killed by a signal". Each run gets fresh leaves under the
cgroups this process already sits in (so any limit placed on us still applies), joined by the
launcher before it execs the sandbox, and removed after the run.

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


@dataclass
class RunCgroup:
    """Fresh leaves for one run. ``procs_files`` are what the launcher writes its pid into."""

    leaves: dict[str, Path]

    @classmethod
    def create(cls, max_processes: int | None, memory_bytes: int | None) -> RunCgroup:
        name = f"exitagent-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        leaves: dict[str, Path] = {}
        settings = {
            "pids": {"pids.max": max_processes},
            # memsw too, or a host with swap would page the run out instead of stopping it.
            "memory": {"memory.limit_in_bytes": memory_bytes, "memory.memsw.limit_in_bytes": memory_bytes},
        }
        try:
            for controller in CONTROLLERS:
                parent = usable_parent(controller)
                wanted = {k: v for k, v in settings[controller].items() if v is not None}
                if parent is None or not wanted:
                    continue
                leaf = parent / name
                leaf.mkdir()
                leaves[controller] = leaf
                for knob, value in wanted.items():
                    if (leaf / knob).exists():
                        (leaf / knob).write_text(str(value))
        except OSError:
            cls(leaves).remove_now()
            raise
        return cls(leaves)

    @property
    def procs_files(self) -> list[str]:
        return [str(leaf / "cgroup.procs") for leaf in self.leaves.values()]

    @property
    def limits_memory(self) -> bool:
        return "memory" in self.leaves

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

    def oom_killed(self) -> bool:
        leaf = self.leaves.get("memory")
        if leaf is None:
            return False
        try:
            for line in (leaf / "memory.oom_control").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value) > 0
            # Kernels before 4.13 have no oom_kill counter; hitting the cap is the next best sign.
            return int((leaf / "memory.failcnt").read_text()) > 0
        except (OSError, ValueError):
            return False

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

    async def remove(self) -> None:
        """Kill what is left and remove the leaves; SIGKILLed tasks take a moment to leave."""
        for _ in range(200):
            self.kill_all()
            if self.remove_now():
                return
            await anyio.sleep(0.005)
        log.warning("sandbox_cgroup_leaked", leaves=[str(p) for p in self.leaves.values()])
