"""The limits that do not depend on the code's good will, on the real backends: the disk quota over
the workspace and /tmp, the syscall filter, and the refusal to run where no cgroup can cap
processes and memory (a fake, a non-cgroup and an unwritable cgroup root)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from exitagent.errors import SandboxUnavailable
from sandboxes.base import Limits
from sandboxes.cgroups import ALLOW_ENV, ROOT_ENV, VERSION_ENV, current_hierarchy
from sandboxes.factory import open_sandbox
from sandboxes.seccomp import BLOCKED, filter_bpf
from sandboxes.volume import mount_volume, reclaim_orphaned_volumes, unmount_volume, volume_name_prefix

pytestmark = pytest.mark.anyio
REPO = Path(__file__).resolve().parents[2]
FILL = """
import sys
written = 0
try:
    with open(sys.argv[1], "wb") as f:
        for _ in range(int(sys.argv[2])):
            f.write(b"x" * (1 << 20))
            f.flush()
            written += 1
except OSError as err:
    print(sys.argv[1], "stopped", err.errno, err.strerror, written)
else:
    print(sys.argv[1], "wrote", written)
"""


def mounted(path: Path) -> bool:
    return any(line.split()[1] == str(path) for line in Path("/proc/mounts").read_text().splitlines())


# --- the disk quota ------------------------------------------------------------------------------


async def test_the_quota_covers_workspace_and_tmp_together(local_sandbox: Callable[..., Any], tmp_path: Path) -> None:
    free_before = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    limits = Limits(wall_s=20, disk_bytes=24 << 20, max_file_bytes=None)
    async with local_sandbox(limits) as sbx:
        if not sbx.volume:
            pytest.skip("no quota volume here (mounting a tmpfs needs root)")
        await sbx.write_file("fill.py", FILL)
        first = await sbx.exec([sbx.python, "fill.py", "/workspace/a", "16"])
        second = await sbx.exec([sbx.python, "fill.py", "/tmp/b", "16"])  # 16 + 16 MiB > 24 MiB
        third = await sbx.exec([sbx.python, "fill.py", "/workspace/c", "64"])
        with pytest.raises(OSError, match="No space left"):  # the host's own writes count too
            await sbx.write_file("d", b"y" * (16 << 20))
        on_host = sum(p.stat().st_size for p in sbx.root.rglob("*") if p.is_file())
        root = sbx.root
    assert first.stdout == "/workspace/a wrote 16\n"
    assert second.stdout.startswith("/tmp/b stopped 28 No space left on device"), second.stdout + second.stderr
    assert third.stdout.startswith("/workspace/c stopped 28 No space left on device")
    assert on_host <= 24 << 20
    free_after = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    assert abs(free_after - free_before) < 8 << 20  # the host's disk never held the data
    assert not mounted(root) and not root.exists()


def test_a_volume_whose_owner_was_killed_is_reclaimed(tmp_path: Path) -> None:
    """SIGKILL leaves a sandbox's volume mounted; the next sandbox made beside it unmounts it."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f"exitagent-local-{int(gone.stdout)}-abc"  # that pid has exited
    mine = tmp_path / volume_name_prefix("local").rstrip("-")
    for directory in (orphan, mine):
        directory.mkdir()
        if not mount_volume(directory, 1 << 20):
            pytest.skip("mounting a tmpfs needs root")
        (directory / "kept").write_text("x")
    try:
        assert reclaim_orphaned_volumes(tmp_path) == [orphan]
        assert not mounted(orphan) and not orphan.exists()
        assert mounted(mine) and (mine / "kept").exists()  # a live owner's volume stays
    finally:
        unmount_volume(mine)


async def test_no_quota_when_asked_for_none(local_sandbox: Callable[..., Any]) -> None:
    async with local_sandbox(Limits(wall_s=10, disk_bytes=None)) as sbx:
        assert not sbx.volume and not mounted(sbx.root)
        result = await sbx.run_python("import os; print(os.path.exists('/tmp'))")
    assert result.stdout == "True\n"


# --- the syscall filter --------------------------------------------------------------------------

PROBES = """
import ctypes, errno, json, os
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWUSER, CLONE_NEWNET, SIGCHLD = 0x10000000, 0x40000000, 17
calls = {  # x86_64 numbers; every argument is harmless or invalid on purpose
    "ptrace": (101, 0, 0, 0, 0),  # PTRACE_TRACEME: succeeds without the filter
    "unshare": (272, CLONE_NEWUSER | CLONE_NEWNET),
    "mount": (165, 0, 0, 0, 0, 0),
    "umount2": (166, 0, 0),
    "keyctl": (250, 0, 0, 0, 0, 0),
    "bpf": (321, 0, 0, 0),
    "perf_event_open": (298, 0, 0, -1, -1, 0),
    "setns": (308, -1, 0),
    "clone_newuser": (56, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0),
    "userfaultfd": (323, 0),
    "kexec_load": (246, 0, 0, 0, 0),
    "init_module": (175, 0, 0, 0),
}
out = {}
for name, (number, *args) in calls.items():
    result = libc.syscall(number, *args)
    if result == 0 and name == "clone_newuser":
        os._exit(0)  # the child of a clone that got through
    out[name] = errno.errorcode.get(ctypes.get_errno(), "ok") if result == -1 else "ok"
print(json.dumps(out))
"""

WORK = """
import json, os, subprocess, threading, multiprocessing
import numpy, pandas, sklearn.linear_model
pid = os.fork()
if pid == 0:
    os._exit(7)
forked = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
threads = []
for _ in range(4):
    threads.append(threading.Thread(target=sum, args=(range(1000),)))
    threads[-1].start()
[t.join() for t in threads]
with multiprocessing.Pool(2) as pool:
    squares = pool.map(abs, [-1, -2, -3])
model = sklearn.linear_model.LogisticRegression().fit(numpy.eye(4), [0, 1, 0, 1])
print(json.dumps({"fork": forked, "spawn": subprocess.run(["echo", "hi"], capture_output=True).stdout.decode(),
                  "pool": squares, "frame": int(pandas.DataFrame({"a": [1, 2]}).a.sum()),
                  "fit": len(model.coef_[0])}))
"""


async def test_the_filter_makes_kernel_attack_surface_fail_with_eperm(local_sandbox: Callable[..., Any]) -> None:
    async with local_sandbox(Limits(wall_s=30)) as sbx:
        result = await sbx.run_python(PROBES)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == dict.fromkeys(json.loads(result.stdout), "EPERM")


async def test_ordinary_python_work_still_runs_under_the_filter(local_sandbox: Callable[..., Any]) -> None:
    async with local_sandbox(Limits(wall_s=60)) as sbx:
        result = await sbx.run_python(WORK)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == {"fork": 7, "spawn": "hi\n", "pool": [1, 2, 3], "frame": 3, "fit": 4}


def test_the_filter_is_built_from_the_whole_list() -> None:
    program = filter_bpf()
    assert len(program) % 8 == 0 and len(program) > 8 * len(BLOCKED)  # one BPF instruction is 8 bytes


# --- no cgroups: refuse, unless the user opts out --------------------------------------------------


def _fake_root(tmp_path: Path, kind: str) -> Path:
    root = tmp_path / f"cgroup-{kind}"
    root.mkdir()
    if kind == "plain-dirs":  # writable directories that look like hierarchies but are not
        for controller in ("pids", "memory", "unified"):
            (root / controller).mkdir()
            (root / controller / "cgroup.procs").touch()
    if kind == "v2-without-controllers":
        (root / "cgroup.controllers").write_text("cpu io\n")
        (root / "cgroup.subtree_control").write_text("")
    return root


@pytest.mark.parametrize(("kind", "said"), [
    ("empty", "not mounted as cgroup v1"),
    ("plain-dirs", "is not a cgroup file system"),
    ("v2-without-controllers", "does not offer it"),
])  # fmt: skip
@pytest.mark.parametrize("backend", ["local", "process"])
async def test_a_host_without_cgroups_is_refused(
    backend: str, kind: str, said: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ROOT_ENV, str(_fake_root(tmp_path, kind)))
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    with pytest.raises(SandboxUnavailable, match=ALLOW_ENV) as refused:
        await open_sandbox(backend, base_dir=tmp_path)
    assert said in str(refused.value)
    assert not [n for n in os.listdir(tmp_path) if n.startswith("exitagent-")]  # refused before anything was made


async def test_opting_out_runs_without_cgroups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ROOT_ENV, str(_fake_root(tmp_path, "empty")))
    monkeypatch.setenv(ALLOW_ENV, "1")
    async with open_sandbox("process", base_dir=tmp_path, limits=Limits(wall_s=10, memory_bytes=64 << 20)) as sbx:
        result = await sbx.run_python("b = bytearray(256 << 20)")
    assert result.out_of_memory and "MemoryError" in result.stderr  # RLIMIT_DATA stands in


async def test_a_bad_cgroup_version_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(VERSION_ENV, "3")
    with pytest.raises(SandboxUnavailable, match="must be 1 or 2"):
        await open_sandbox("process")


def test_a_read_only_hierarchy_is_refused() -> None:
    """The real cgroup tree, remounted read-only in a private mount namespace (as a container
    without a delegated cgroup sees it): one clear error, and nothing written."""
    if os.geteuid() != 0 or not current_hierarchy().parents or shutil.which("unshare") is None:
        pytest.skip("needs root, unshare(1) and a cgroup tree that root may use")
    probe = textwrap.dedent("""
        import anyio
        from exitagent.errors import SandboxUnavailable
        from sandboxes.factory import open_sandbox
        try:
            anyio.run(open_sandbox, "process")
        except SandboxUnavailable as err:
            print(err)
    """)
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
              if line.split()[2] in ("cgroup", "cgroup2")]
    remount = "".join(f"mount -o remount,bind,ro {m} && " for m in mounts)
    script = f'{remount}exec "$0" -c "$1"'
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, sys.executable, probe],
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "cannot create a child cgroup" in done.stdout and "Read-only file system" in done.stdout
    assert ALLOW_ENV in done.stdout
