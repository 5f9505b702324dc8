"""Per-run cgroups, v1 or v2: the process cap that stops fork bombs, and the memory cap that tells
us a run was OOM-killed.

RLIMIT_NPROC does nothing when the host user is root (dev and CI are), so a ``pids`` cgroup is the
only reliable fork-bomb guard; a memory cgroup's ``oom_kill`` counter is the only reliable way to
say "out of memory" rather than "killed by a signal". Runs get leaves under the cgroup this process
already sits in (so any limit placed on us still applies), joined by the launcher before it execs
the sandbox, emptied after the run, reused by the sandbox's next run and removed on close.

Which hierarchy (``find_hierarchy``):

- **v2** (unified; most current distributions): our cgroup is the ``0::/path`` line of
  ``/proc/self/cgroup`` under the cgroup2 mount. It must offer ``pids`` and ``memory`` in
  ``cgroup.controllers`` (a delegated sub-tree: ``systemd-run -p Delegate=yes``, a container with
  its own cgroup namespace, or root). They are switched on in its ``cgroup.subtree_control``; a
  non-root cgroup that holds processes may not do that ("no internal processes"), so the processes
  of our own cgroup are first moved into a leaf of it, ``exitagent-host``. Caps: ``pids.max``,
  ``memory.max`` and ``memory.swap.max = 0``; ``cgroup.kill`` empties a leaf in one write.
- **v1**: one directory per controller under ``/sys/fs/cgroup/<controller>``. Caps: ``pids.max``,
  ``memory.limit_in_bytes`` and ``memory.memsw.limit_in_bytes``.

``$EXITAGENT_CGROUP_VERSION`` (``1`` or ``2``) picks one; unset, v2 wins when it has both
controllers. ``$EXITAGENT_CGROUP_ROOT`` says where cgroupfs is mounted (default ``/sys/fs/cgroup``).
Where neither version gives both controllers, ``require_cgroups`` refuses to run untrusted code
(``SandboxUnavailable``, saying why for each version) unless
``EXITAGENT_SANDBOX_ALLOW_NO_CGROUPS=1`` opts out: then runs keep their wall clock and rlimits
(RLIMIT_DATA for memory) and nothing caps the number of processes root may start.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import signal
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import structlog

from exitagent.errors import SandboxUnavailable

log = structlog.get_logger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
ROOT_ENV = "EXITAGENT_CGROUP_ROOT"
VERSION_ENV = "EXITAGENT_CGROUP_VERSION"
ALLOW_ENV = "EXITAGENT_SANDBOX_ALLOW_NO_CGROUPS"
CONTROLLERS = ("pids", "memory")
HOST_LEAF = "exitagent-host"  # v2: where our own cgroup's processes go so it may have children
_KILL_ROUNDS = 1000  # a capped fork bomb refills freed slots; each round kills what it sees


@dataclass(frozen=True)
class Hierarchy:
    """Where run leaves go: ``parents`` maps each usable controller to the directory that gets the
    leaves (one directory for both under v2); ``missing`` says why each other controller is not."""

    version: int
    parents: Mapping[str, Path] = field(default_factory=dict)
    missing: Mapping[str, str] = field(default_factory=dict)


def current_hierarchy() -> Hierarchy:
    """The hierarchy the environment asks for (module docstring); found once per setting."""
    root = Path(os.environ.get(ROOT_ENV) or CGROUP_ROOT)
    version = os.environ.get(VERSION_ENV, "").strip()
    if version not in ("", "1", "2"):
        raise SandboxUnavailable(f"{VERSION_ENV} must be 1 or 2, not {version!r}")
    return find_hierarchy(root, version)


@functools.cache
def find_hierarchy(root: Path, version: str = "") -> Hierarchy:
    if version == "1":
        return _find_v1(root)
    if version == "2":
        return _find_v2(root)
    v2 = _find_v2(root)
    if not v2.missing:
        return v2
    v1 = _find_v1(root)
    if not v1.missing:
        return v1
    best = v1 if len(v1.parents) >= len(v2.parents) else v2
    reasons = {c: f"v1: {v1.missing.get(c, 'usable')}; v2: {v2.missing.get(c, 'usable')}" for c in best.missing}
    return Hierarchy(best.version, best.parents, reasons)


def require_cgroups(hierarchy: Hierarchy) -> None:
    """Refuse untrusted code without a process and memory cap, unless the user opted out."""
    if not hierarchy.missing:
        return
    why = "; ".join(f"{c}: {reason}" for c, reason in hierarchy.missing.items())
    if os.environ.get(ALLOW_ENV, "").strip() == "1":
        _warn_once(why)
        return
    raise SandboxUnavailable(
        f"no usable cgroup for the sandbox's limits ({why}). Run as root, or in a delegated cgroup v2 "
        "sub-tree with the pids and memory controllers (e.g. `systemd-run --user --scope -p "
        f"Delegate=yes ...`), or set {ALLOW_ENV}=1 to run without a process cap and memory cgroup"
    )


@functools.cache
def _warn_once(why: str) -> None:
    log.warning("sandbox_cgroups_unavailable", reason=why, lost="fork-bomb cap, memory cgroup and OOM detection")


def _own_cgroup(match: str) -> str | None:
    """Our path in the hierarchy whose controller list contains ``match`` ("" is v2's ``0::``)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        number, names, path = line.split(":", 2)
        if (match == "" and number == "0") or (match and match in names.split(",")):
            return path
    return None


def _probe_child(parent: Path, knob: str) -> str | None:
    """Make and remove a child: None if that works and the kernel gave it ``knob``, else why not."""
    probe = parent / f"exitagent-probe-{os.getpid()}"
    try:
        probe.mkdir()
    except OSError as err:
        return f"cannot create a child cgroup in {parent}: {err.strerror}"
    made = (probe / knob).exists()
    with contextlib.suppress(OSError):
        probe.rmdir()
    return None if made else f"{parent} is not a cgroup file system (a child has no {knob})"


def _find_v1(root: Path) -> Hierarchy:
    parents: dict[str, Path] = {}
    missing: dict[str, str] = {}
    for controller in CONTROLLERS:
        own = _own_cgroup(controller)
        parent = root / controller / (own or "/").lstrip("/")
        if own is None or not parent.is_dir():
            missing[controller] = f"not mounted as cgroup v1 at {root / controller}"
            continue
        reason = _probe_child(parent, "cgroup.procs")
        if reason is None:
            parents[controller] = parent
        else:
            missing[controller] = reason
    return Hierarchy(1, parents, missing)


def _find_v2(root: Path) -> Hierarchy:
    mount = root if (root / "cgroup.controllers").exists() else root / "unified"
    own = _own_cgroup("")
    if own is None or not (mount / "cgroup.controllers").exists():
        return Hierarchy(2, {}, dict.fromkeys(CONTROLLERS, f"no cgroup2 mount at {root} or {root / 'unified'}"))
    parent = mount / own.lstrip("/")
    try:
        offered = (parent / "cgroup.controllers").read_text().split()
    except OSError as err:
        return Hierarchy(2, {}, dict.fromkeys(CONTROLLERS, f"cannot read {parent}/cgroup.controllers: {err.strerror}"))
    missing = {c: _not_offered(root, parent, c, offered) for c in CONTROLLERS if c not in offered}
    if missing:
        return Hierarchy(2, {}, missing)
    reason = _enable_v2(parent) or _probe_child(parent, "pids.max")
    if reason is not None:
        return Hierarchy(2, {}, dict.fromkeys(CONTROLLERS, reason))
    return Hierarchy(2, dict.fromkeys(CONTROLLERS, parent))


def _not_offered(root: Path, parent: Path, controller: str, offered: list[str]) -> str:
    bound = " (it is bound to the cgroup v1 hierarchy there)" if (root / controller / "cgroup.procs").exists() else ""
    return f"cgroup v2 at {parent} does not offer it{bound}; cgroup.controllers: {' '.join(offered) or 'none'}"


def _enable_v2(parent: Path) -> str | None:
    """Switch the controllers on for ``parent``'s children; None when done, else why not."""
    control = parent / "cgroup.subtree_control"
    try:
        enabled = control.read_text().split()
        wanted = " ".join(f"+{c}" for c in CONTROLLERS if c not in enabled)
        if not wanted:
            return None
        try:
            control.write_text(wanted)
        except OSError as err:
            if err.errno != errno.EBUSY:
                raise
            _move_members(parent, parent / HOST_LEAF)  # "no internal processes": make room
            control.write_text(wanted)
    except OSError as err:
        return f"cannot enable {' '.join(CONTROLLERS)} in {control}: {err.strerror}"
    log.info("sandbox_cgroup_v2_enabled", cgroup=str(parent), controllers=list(CONTROLLERS))
    return None


def _move_members(parent: Path, leaf: Path) -> None:
    leaf.mkdir(exist_ok=True)
    moved = []
    for pid in (parent / "cgroup.procs").read_text().split():
        try:
            (leaf / "cgroup.procs").write_text(pid)
            moved.append(int(pid))
        except ProcessLookupError:
            continue  # it exited meanwhile
    log.info("sandbox_cgroup_processes_moved", to=str(leaf), pids=moved)


@dataclass
class RunCgroup:
    """Leaves (one per usable controller under v1, one shared under v2) that hold one run at a
    time. ``procs_files`` are what the launcher writes its pid into."""

    leaves: dict[str, Path]
    version: int = 1
    limits_memory: bool = False  # the current run has a memory cap here (so OOM is detectable)
    _oom_base: int = 0

    @classmethod
    def create(cls, hierarchy: Hierarchy) -> RunCgroup:
        name = f"exitagent-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        cgroup = cls({}, hierarchy.version)
        try:
            for controller, parent in hierarchy.parents.items():
                (parent / name).mkdir(exist_ok=hierarchy.version == 2)
                cgroup.leaves[controller] = parent / name
        except OSError:
            cgroup.remove_now()
            raise
        return cgroup

    @property
    def dirs(self) -> list[Path]:
        return list(dict.fromkeys(self.leaves.values()))

    def configure(self, max_processes: int | None, memory_bytes: int | None) -> None:
        """Set this run's caps; ``None`` lifts one. Raises OSError if the kernel refuses."""
        pids = "max" if max_processes is None else str(max_processes)
        if self.version == 2:
            memory = "max" if memory_bytes is None else str(memory_bytes)
            swap = "max" if memory_bytes is None else "0"  # no swap: a capped run stops, not pages
            knobs = [("pids", "pids.max", pids), ("memory", "memory.max", memory), ("memory", "memory.swap.max", swap)]
        else:
            # memsw (memory+swap) must stay >= the memory cap at every step: lift it, set the cap,
            # then lower it to match.
            memory = "-1" if memory_bytes is None else str(memory_bytes)
            knobs = [("pids", "pids.max", pids), ("memory", "memory.memsw.limit_in_bytes", "-1"),
                     ("memory", "memory.limit_in_bytes", memory), ("memory", "memory.memsw.limit_in_bytes", memory)]
        for controller, knob, value in knobs:
            leaf = self.leaves.get(controller)
            if leaf is not None and (leaf / knob).exists():
                (leaf / knob).write_text(value)
        self.limits_memory = "memory" in self.leaves and memory_bytes is not None
        self._oom_base = self._oom_count()

    @property
    def procs_files(self) -> list[str]:
        return [str(leaf / "cgroup.procs") for leaf in self.dirs]

    def members(self) -> set[int]:
        pids: set[int] = set()
        for leaf in self.dirs:
            try:
                pids.update(int(p) for p in (leaf / "cgroup.procs").read_text().split())
            except OSError:
                continue
        return pids

    def kill_all(self) -> None:
        """SIGKILL every member until none is left (a fork bomb refills the gaps for a while)."""
        for leaf in self.dirs:
            if self.version == 2 and (leaf / "cgroup.kill").exists():  # Linux 5.14+: atomic
                with contextlib.suppress(OSError):
                    (leaf / "cgroup.kill").write_text("1")
        for _ in range(_KILL_ROUNDS):
            members = self.members()
            if not members:
                return
            for pid in members:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        log.warning("sandbox_cgroup_not_emptied", leaves=[str(p) for p in self.dirs])

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
        events = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            for line in (leaf / events).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
            # v1 kernels before 4.13 have no oom_kill counter; hitting the cap is the next best sign.
            return int((leaf / "memory.failcnt").read_text()) if self.version == 1 else 0
        except (OSError, ValueError):
            return 0

    def remove_now(self) -> bool:
        """Try once to remove the leaves; ``False`` while a dying member still holds one."""
        for leaf in self.dirs:
            try:
                leaf.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                continue
            self.leaves = {c: p for c, p in self.leaves.items() if p != leaf}
        return not self.leaves


class CgroupPool:
    """Leaves for one sandbox, reused run after run: making and removing a memory cgroup costs
    about 10 ms a run here, reusing one costs a few writes. Concurrent runs get separate leaves, so
    a run's sweep never kills another run's processes. ``close`` removes them all."""

    def __init__(self, hierarchy: Hierarchy | None = None) -> None:
        self.hierarchy = hierarchy if hierarchy is not None else current_hierarchy()
        self._free: list[RunCgroup] = []
        self._all: list[RunCgroup] = []

    async def take(self, max_processes: int | None, memory_bytes: int | None) -> RunCgroup:
        cgroup = self._free.pop() if self._free else None
        if cgroup is None:
            cgroup = RunCgroup.create(self.hierarchy)
            self._all.append(cgroup)
        cgroup.configure(max_processes, memory_bytes)
        return cgroup

    async def give_back(self, cgroup: RunCgroup) -> None:
        if await cgroup.empty():
            self._free.append(cgroup)
        else:  # something will not die: never reuse it, let close() try again
            log.warning("sandbox_cgroup_not_emptied", leaves=[str(p) for p in cgroup.dirs])

    async def close(self) -> None:
        for cgroup in self._all:
            if not (await cgroup.empty() and cgroup.remove_now()):
                log.warning("sandbox_cgroup_leaked", leaves=[str(p) for p in cgroup.dirs])
        self._all.clear()
        self._free.clear()
