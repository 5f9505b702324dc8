"""A throw-away PostgreSQL cluster for tests and benchmarks: initdb + pg_ctl on a temporary directory.

The server refuses to run as root, so as root the cluster belongs to the ``postgres`` user (the
Debian package creates it) and every server command runs through ``runuser``. Local (unix socket)
connections are trusted; TCP on 127.0.0.1 asks for a password (``PASSWORD``), so the
wrong-password path is real too. ``fsync`` is off unless asked for: tests kill clients, never
the machine.

    with Cluster.start() as cluster:
        url = cluster.url(schema="t1")      # postgresql://postgres@/postgres?host=SOCKDIR&port=P&schema=t1
        cluster.restart()                   # pg_ctl restart -m fast: every session is cut
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

PASSWORD = "exitagent-test-password"
USER = "postgres"


def binaries() -> Path | None:
    """The directory of initdb and pg_ctl (Debian keeps them out of PATH), or None when not installed."""
    found = shutil.which("initdb") and shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    bindir: Path
    root: Path  # data/, socket/, log
    port: int
    fsync: bool = False

    @property
    def socket_dir(self) -> Path:
        return self.root / "socket"

    def url(self, schema: str = "", *, tcp: bool = False, password: str | None = None) -> str:
        query = f"?schema={schema}" if schema else ""
        if tcp:
            auth = f"{USER}:{password}" if password is not None else USER
            return f"postgresql://{auth}@127.0.0.1:{self.port}/postgres{query}"
        sep = "&" if query else "?"
        return f"postgresql://{USER}@/postgres{query}{sep}host={self.socket_dir}&port={self.port}"

    def _run(self, *args: str, timeout: float = 60) -> None:
        as_owner = ["runuser", "-u", USER, "--"] if os.geteuid() == 0 else []
        subprocess.run([*as_owner, str(self.bindir / args[0]), *args[1:]], check=True, timeout=timeout,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def _pg_ctl(self, command: str, *extra: str) -> None:
        options = f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1 -c max_connections=200"
        if not self.fsync:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run("pg_ctl", command, "-D", str(self.root / "data"), "-l", str(self.root / "log"), "-w",
                  "-o", options, *extra)

    @classmethod
    def start(cls, *, fsync: bool = False) -> Cluster:
        bindir = binaries()
        if bindir is None:
            raise FileNotFoundError("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
        root = Path(tempfile.mkdtemp(prefix="exitagent-pg-"))
        (root / "socket").mkdir()
        (root / "pwfile").write_text(PASSWORD + "\n")
        if os.geteuid() == 0:
            shutil.chown(root, USER)
            for path in (root / "socket", root / "pwfile"):
                shutil.chown(path, USER)
        cluster = cls(bindir, root, _free_port(), fsync)
        try:
            cluster._run("initdb", "-D", str(root / "data"), "-U", USER, "--auth-local=trust",
                         "--auth-host=scram-sha-256", f"--pwfile={root / 'pwfile'}", "-E", "UTF8", "--no-sync")
            cluster._pg_ctl("start")
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        return cluster

    def restart(self) -> None:
        self._pg_ctl("restart", "-m", "fast")

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "stop", "-D", str(self.root / "data"), "-m", "immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def skip_or_fail(reason: str) -> None:
    """Skip a PostgreSQL test where the server is not installed, but fail in CI, where it must be."""
    import pytest

    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI must run the PostgreSQL tests: scripts/setup.sh installs the server)")
    pytest.skip(reason)


def cluster_fixture():  # type: ignore[no-untyped-def]
    """The session's throw-away cluster (``postgres`` fixture, registered in conftest.py)."""
    if binaries() is None:
        skip_or_fail("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    cluster = Cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
