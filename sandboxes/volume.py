"""The disk quota of a sandbox: its whole directory (workspace and /tmp) is one size-limited tmpfs.

A per-file limit (RLIMIT_FSIZE) does not stop code from writing many files; a quota on the
filesystem does. ``mount_volume`` mounts a tmpfs of ``Limits.disk_bytes`` on the sandbox's host
directory before anything is made in it, so the workspace, the private /tmp (bound into the jail)
and the host's own writes all share one budget and a full volume says ENOSPC. ``close`` unmounts
it, which frees everything at once.

Memory: a tmpfs is RAM. Its pages are charged to the memory cgroup of whoever wrote them, so a
run's memory cap bounds what that run can write plus what it allocates (a run that writes 500 MiB
under a 512 MiB cap is OOM-killed), and pages stay charged to the run's leaf, which the sandbox's
next run reuses: files kept in the workspace count against later runs' memory too, until they are
deleted. Host RAM held by one sandbox is at most ``disk_bytes`` plus its runs' memory caps. There
is no swap accounting to lean on (the cgroups forbid swap).

Mounting needs CAP_SYS_ADMIN on the host (root). Without it, the quota is skipped with one
warning and the sandbox falls back to a host directory with the per-file limit, the bounded
tmpfs /tmp of the jail, and nothing else. A sandbox whose owner is killed with SIGKILL cannot unmount
its volume; its directory name carries the owner's pid, so ``reclaim_orphaned_volumes`` (run before
each new sandbox is made) unmounts and removes the volumes of owners that are gone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import re
import shutil
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

MS_NOSUID, MS_NODEV = 2, 4
MNT_DETACH = 2


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def mount_volume(directory: Path, size_bytes: int) -> bool:
    """Mount a tmpfs of ``size_bytes`` on ``directory``; False (with one warning) when not allowed."""
    options = f"size={size_bytes},mode=0700".encode()
    done = _libc().mount(b"tmpfs", os.fsencode(directory), b"tmpfs", MS_NOSUID | MS_NODEV, options)
    if done == 0:
        return True
    _warn_once(os.strerror(ctypes.get_errno()))
    return False


def unmount_volume(directory: Path) -> None:
    """Detach the volume (lazily, should something still hold a file in it)."""
    if _libc().umount2(os.fsencode(directory), MNT_DETACH) != 0:
        log.warning("sandbox_volume_not_unmounted", path=str(directory), error=os.strerror(ctypes.get_errno()))


# The sandbox directory's name: exitagent-<backend>-<owner pid>-<random> (sandboxes.workspace).
_OWNED = re.compile(r"exitagent-[a-z0-9_]+-(\d+)-[^/]+")


def volume_name_prefix(backend: str) -> str:
    return f"exitagent-{backend}-{os.getpid()}-"


def reclaim_orphaned_volumes(base_dir: str | Path) -> list[Path]:
    """Unmount and remove the sandbox volumes under ``base_dir`` whose owner process is gone."""
    base_dir = Path(base_dir).resolve()
    reclaimed = []
    for mount_point in _tmpfs_mount_points():
        owner = _OWNED.fullmatch(mount_point.name)
        if mount_point.parent != base_dir or owner is None or Path(f"/proc/{owner.group(1)}").exists():  # owner alive
            continue
        unmount_volume(mount_point)
        shutil.rmtree(mount_point, ignore_errors=True)
        reclaimed.append(mount_point)
        log.warning("sandbox_volume_reclaimed", path=str(mount_point), owner_pid=int(owner.group(1)))
    return reclaimed


def _tmpfs_mount_points() -> list[Path]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        before, _, after = line.partition(" - ")
        if after.split(" ", 1)[0] == "tmpfs":  # mount point: field 5, octal-escaped
            points.append(Path(before.split(" ")[4].encode().decode("unicode_escape")))
    return points


@functools.cache
def _warn_once(reason: str) -> None:
    log.warning("sandbox_disk_quota_unavailable", reason=f"cannot mount a tmpfs: {reason}",
                lost="total disk quota (only the per-file limit and the jail's /tmp size remain)")
