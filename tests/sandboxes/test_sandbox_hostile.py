"""Hostile model code against the real ``local`` (bubblewrap) and ``process`` backends.

Each test runs one attack and checks two things: the result says what happened (a flag, an exit
code, the output), and no process of the run is left on the host afterwards. Isolation tests
(network, host files, writes outside the workspace) run on ``local`` only: ``process`` promises
resource bounds and cleanup, not isolation.
"""

from __future__ import annotations

import os
import socket
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sandboxes.base import Limits

pytestmark = pytest.mark.anyio
REPO = Path(__file__).resolve().parents[2]


def existing(*paths: str) -> list[str]:
    return [p for p in paths if os.path.lexists(p)]


def code(text: str) -> str:
    return textwrap.dedent(text).strip() + "\n"


async def test_infinite_loop_times_out(make_sandbox: Callable[..., Any], leftovers: Any, cgroup_leaves: Any) -> None:
    async with make_sandbox(Limits(wall_s=1.0)) as sbx:
        result = await sbx.run_python("while True:\n    pass\n")
    assert result.timed_out and result.exit_code is None
    assert 0.9 < result.duration_s < 3.0
    assert leftovers() == [] and cgroup_leaves() == []


async def test_cpu_limit_kills_a_spinning_process(make_sandbox: Callable[..., Any], leftovers: Any) -> None:
    async with make_sandbox(Limits(wall_s=10, cpu_s=1)) as sbx:
        result = await sbx.run_python("while True:\n    pass\n")
    assert not result.timed_out
    assert result.exit_code == 128 + 24  # SIGXCPU at the soft limit
    assert leftovers() == []


async def test_fork_bomb_is_capped_and_reaped(
    make_sandbox: Callable[..., Any], leftovers: Any, cgroup_leaves: Any, require_cgroup: Any
) -> None:
    require_cgroup("pids")
    bomb = code("""
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """)
    async with make_sandbox(Limits(wall_s=1.5, max_processes=32)) as sbx:
        result = await sbx.run_python(bomb)
    assert result.timed_out
    assert leftovers() == [] and cgroup_leaves() == []


async def test_process_cap_holds(make_sandbox: Callable[..., Any], leftovers: Any, require_cgroup: Any) -> None:
    require_cgroup("pids")
    spawner = code("""
        import os, time
        made = 0
        for _ in range(100):
            try:
                if os.fork() == 0:
                    time.sleep(30)
                    os._exit(0)
                made += 1
            except OSError:
                break
        print(made)
    """)
    async with make_sandbox(Limits(wall_s=10, max_processes=20)) as sbx:
        result = await sbx.run_python(spawner)
    assert result.exit_code == 0, result.stderr
    assert 5 < int(result.stdout) < 20  # the launcher chain and the interpreter use a few
    assert leftovers() == []


async def test_memory_bomb_is_reported_out_of_memory(make_sandbox: Callable[..., Any], leftovers: Any) -> None:
    hog = "chunks = []\nwhile True:\n    chunks.append(b'x' * (16 << 20))\n"
    async with make_sandbox(Limits(wall_s=20, memory_bytes=128 << 20)) as sbx:
        result = await sbx.run_python(hog)
    assert result.out_of_memory and not result.timed_out
    assert result.exit_code not in (0, None)
    assert leftovers() == []


async def test_file_size_limit_stops_a_disk_fill(make_sandbox: Callable[..., Any], leftovers: Any) -> None:
    fill = "with open('big', 'wb') as f:\n    while True:\n        f.write(b'x' * (1 << 20))\n"
    async with make_sandbox(Limits(wall_s=10, max_file_bytes=8 << 20)) as sbx:
        result = await sbx.run_python(fill)
        size = len(await sbx.read_file("big", binary=True))
    assert result.exit_code == 1 and "File too large" in result.stderr
    assert size <= 8 << 20
    assert leftovers() == []


async def test_output_flood_is_capped_and_timed_out(make_sandbox: Callable[..., Any], leftovers: Any) -> None:
    async with make_sandbox(Limits(wall_s=1.0, max_output_bytes=64 << 10)) as sbx:
        result = await sbx.run_python("while True:\n    print('y' * 1000)\n")
    assert result.timed_out and result.truncated
    assert len(result.stdout) < (64 << 10) + 200
    assert leftovers() == []


async def test_output_cap_keeps_head_and_tail(make_sandbox: Callable[..., Any]) -> None:
    flood = "print('HEAD'); print('z' * (4 << 20)); print('TAIL')\n"
    async with make_sandbox(Limits(wall_s=10, max_output_bytes=4096)) as sbx:
        result = await sbx.run_python(flood)
    assert result.exit_code == 0 and result.truncated
    assert result.stdout.startswith("HEAD\n") and result.stdout.endswith("TAIL\n")
    assert "bytes of output cut" in result.stdout and len(result.stdout) < 4096 + 100


async def test_detached_grandchild_does_not_outlive_the_run(
    backend: str, make_sandbox: Callable[..., Any], leftovers: Any, require_cgroup: Any
) -> None:
    if backend == "process":
        require_cgroup("pids")  # without a cgroup a setsid escapee is out of reach
    daemon = "import subprocess\nsubprocess.Popen(['setsid', 'sleep', '300'])\nprint('parent done')\n"
    async with make_sandbox(Limits(wall_s=10)) as sbx:
        result = await sbx.run_python(daemon)
    assert result.exit_code == 0 and result.stdout == "parent done\n"
    assert result.duration_s < 5  # the daemon held our pipes; it had to die for us to return
    assert leftovers() == []


async def test_host_environment_does_not_leak(
    make_sandbox: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("E2B_API_KEY", "e2b_secret_from_host")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-from-host")
    async with make_sandbox(env={"GIVEN": "yes"}) as sbx:
        result = await sbx.exec(["env"])
    assert "secret" not in result.stdout
    assert "GIVEN=yes" in result.stdout and "OMP_NUM_THREADS=1" in result.stdout


# --- isolation: local only -----------------------------------------------------------------------


async def test_no_network_not_even_host_localhost(local_sandbox: Callable[..., Any]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        probe = code(f"""
            import socket
            for host, port in [("127.0.0.1", {port}), ("1.1.1.1", 53), ("example.com", 80)]:
                try:
                    socket.create_connection((host, port), timeout=2).close()
                    print("reached", host)
                except OSError as err:
                    print("blocked", host, type(err).__name__)
        """)
        async with local_sandbox() as sbx:
            result = await sbx.run_python(probe)
    assert result.exit_code == 0, result.stderr
    assert "reached" not in result.stdout and result.stdout.count("blocked") == 3


async def test_host_files_are_invisible(local_sandbox: Callable[..., Any]) -> None:
    secrets = ["/etc/shadow", str(REPO / "pyproject.toml"), str(REPO / "exitagent" / "errors.py")]
    assert existing(*secrets) == secrets  # they are there to be stolen on the host
    targets = [*secrets, str(Path.home() / ".ssh"), "/home", "/run", "/var", "/etc/hostname"]
    snoop = f"import os\nfor path in {targets!r}:\n    print(path, os.path.lexists(path))\n"
    async with local_sandbox() as sbx:
        result = await sbx.run_python(snoop)
    assert result.exit_code == 0, result.stderr
    assert "True" not in result.stdout, result.stdout
    assert result.stdout.count("False") == len(targets)


async def test_writes_outside_the_workspace_fail(local_sandbox: Callable[..., Any]) -> None:
    targets = ["/usr/exitagent-pwned", f"{sys.prefix}/exitagent-pwned", "/etc/exitagent-pwned",
               "/exitagent-pwned", "/workspace/../exitagent-pwned"]  # fmt: skip
    writer = code(f"""
        for path in {targets!r}:
            try:
                open(path, "w").write("x")
                print("wrote", path)
            except OSError as err:
                print("refused", path, err.errno)
        open("/tmp/scratch", "w").write("private /tmp is fine")
    """)
    async with local_sandbox() as sbx:
        result = await sbx.run_python(writer)
    assert result.exit_code == 0, result.stderr
    assert "wrote" not in result.stdout
    assert existing(*targets) == []


async def test_planted_symlinks_do_not_reach_the_host(local_sandbox: Callable[..., Any]) -> None:
    async with local_sandbox() as sbx:
        await sbx.exec(["ln", "-s", "/etc/passwd", "leak"])
        await sbx.exec(["ln", "-s", "/etc", "outdir"])
        await sbx.exec(["mkfifo", "pipe"])
        with pytest.raises(PermissionError):
            await sbx.read_file("leak")
        with pytest.raises(PermissionError):
            await sbx.write_file("outdir/exitagent-pwned", "x")
        with pytest.raises(PermissionError):
            await sbx.read_file("pipe")  # a FIFO would block the host forever
    assert existing("/etc/exitagent-pwned") == []


@pytest.mark.parametrize("scratch", ["/tmp", "/dev/shm"])
async def test_scratch_space_is_private_and_bounded(local_sandbox: Callable[..., Any], scratch: str) -> None:
    # /tmp is bounded by the disk quota it shares with the workspace (or by tmp_bytes where no quota
    # volume can be mounted), /dev/shm by tmp_bytes
    fill = f"with open('{scratch}/fill', 'wb') as f:\n    while True:\n        f.write(b'x' * (1 << 20))\n"
    async with local_sandbox(Limits(wall_s=10, tmp_bytes=8 << 20, disk_bytes=8 << 20)) as sbx:
        result = await sbx.run_python(fill)
    assert result.exit_code == 1 and "No space left" in result.stderr
    assert existing(f"{scratch}/fill") == []


async def test_root_and_dev_are_read_only_but_devices_work(local_sandbox: Callable[..., Any]) -> None:
    probe = "for p in /x /dev/x /dev/null; do (echo x > $p) 2>/dev/null && echo $p ok || echo $p no; done"
    async with local_sandbox() as sbx:
        result = await sbx.exec(["sh", "-c", probe])
    assert result.stdout.split("\n")[:3] == ["/x no", "/dev/x no", "/dev/null ok"]
