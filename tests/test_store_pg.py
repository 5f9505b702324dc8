"""What only the PostgreSQL store can meet: an unreachable server, a refused login, a session cut
mid-transaction, a server restart under load, and many collector processes plus a trainer killed
at random. All on a real throw-away cluster (tests/postgres.py); the processes are real, their
groups synthetic (tests/store_workers.py: the curriculum and the store, no model).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from exitagent.curriculum import __main__ as curriculum_cli
from exitagent.errors import ConfigError, StoreUnavailable
from exitagent.store_url import URL_FILENAME, open_run_store, open_store, pin_run_store, redact, schema_for
from tests.postgres import PASSWORD, Cluster
from tests.test_store import REPO, assert_consistent, expect, group, raw, worker

G = 4  # rollouts per group (store_workers' default)


@pytest.fixture
def target(postgres: Cluster) -> str:
    return postgres.url(schema=f"t_{uuid.uuid4().hex[:12]}")


def test_unreachable_server_and_refused_login(postgres: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(StoreUnavailable, match=r"Connection refused.*is PostgreSQL running"):
        open_store("postgresql://postgres@127.0.0.1:1/postgres?schema=x", connect_timeout_s=3)
    wrong = postgres.url(schema="x", tcp=True, password="not-the-password")
    with pytest.raises(StoreUnavailable, match=r"password authentication failed.*PGPASSWORD") as refused:
        open_store(wrong)
    assert "not-the-password" not in str(refused.value)  # errors show the URL redacted
    monkeypatch.setenv("PGPASSWORD", PASSWORD)  # the password from the environment, none in the URL
    with open_store(postgres.url(schema="x", tcp=True)) as store:
        assert store.groups() == []


def test_password_on_the_command_line_is_warned_and_a_url_file_works(
        postgres: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = postgres.url(schema=f"t_{uuid.uuid4().hex[:8]}", tcp=True, password=PASSWORD)
    assert redact(url).count("***") == 1 and PASSWORD not in redact(url)
    run = tmp_path / "My Run-1"
    with open_run_store(run, url) as store:
        store.record_group(group("g1"), lambda buffer: None)
    assert "password" in capsys.readouterr().err  # the warning, on stderr
    pin_run_store(run, url)  # what exitagent.run --store does: the URL file, readable by its owner only
    assert (run / URL_FILENAME).stat().st_mode & 0o777 == 0o600
    with pytest.raises(ConfigError, match="names another store"):
        pin_run_store(run, url + "&x=1")
    assert curriculum_cli.main(["show", str(run)]) == 0  # no flag: RUN/store.url
    assert schema_for(run) == "my_run_1"
    assert "groups: 1 (" in capsys.readouterr().out


def test_a_session_cut_mid_transaction_is_retried_whole(target: str) -> None:
    """The server ends the collector's session while its write is open (children inserted, group not):
    nothing of it stays, and the collector records the group once on a new connection."""
    collector = worker("collect", target, "cut", "3", "--pause-once", "2")
    expect(collector, "ready")
    expect(collector, "inside")
    killed = raw(target, "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted")
    assert killed == [(True,)]
    assert collector.wait(timeout=60) == 0
    assert [g for (g,) in raw(target, "SELECT id FROM groups ORDER BY seq")] == ["cut-0", "cut-1", "cut-2"]
    children = raw(target, "SELECT group_id, count(*) FROM entries GROUP BY group_id ORDER BY group_id")
    assert all(count <= G for _, count in children)  # one application of each update, not two
    assert_consistent(target)


def _consumed(logs: list[Path]) -> list[str]:
    """Every group id any consumer logged as trained, in order (a group twice means trained twice)."""
    return [gid for log in logs if log.exists() for line in log.read_text().splitlines() for gid in line.split()[1:]]


def _finish(collectors: list[subprocess.Popen[str]], consumer: subprocess.Popen[str]) -> None:
    for c in collectors:
        assert c.wait(timeout=240) == 0
    assert consumer.wait(timeout=120) == 0  # it stops after 3 s without new groups


def _check_run(target: str, log: Path) -> None:
    assert_consistent(target, group_size=G)
    recorded = {g for (g,) in raw(target, "SELECT id FROM groups")}
    trained = _consumed([log])
    assert len(trained) == len(set(trained)), "a group was trained twice"
    assert set(trained) == recorded, "a recorded group was never trained"
    assert raw(target, "SELECT count(*) FROM groups WHERE consumed_by_step IS NULL") == [(0,)]


def test_four_collectors_and_a_trainer_killed_at_random(target: str, tmp_path: Path) -> None:
    rng = random.Random(16)
    log = tmp_path / "consumed.log"
    open_store(target).close()
    names = [f"c{i}" for i in range(4)]
    collectors = {name: worker("collect", target, name, "25", "--tokens", "2000") for name in names}
    consumer = worker("consume", target, str(log), "--batch", "6")
    kills = 0
    for _ in range(6):  # kill -9 one of them at a random moment, then start it again
        time.sleep(rng.uniform(0.3, 1.5))
        victim = rng.choice([*names, "trainer"])
        process = consumer if victim == "trainer" else collectors[victim]
        if process.poll() is not None:
            continue
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        kills += 1
        assert_consistent(target, group_size=G)
        if victim == "trainer":
            consumer = worker("consume", target, str(log), "--batch", "6")
        else:
            fresh = f"{victim}r{rng.randrange(10**6)}"  # a restarted collector has a new session id
            collectors[victim] = worker("collect", target, fresh, "10", "--tokens", "2000")
    _finish(list(collectors.values()), consumer)
    assert kills >= 3
    _check_run(target, log)


def test_postgres_restart_mid_run_is_survived(postgres: Cluster, target: str, tmp_path: Path) -> None:
    log = tmp_path / "consumed.log"
    open_store(target).close()
    errors = [tmp_path / f"c{i}.err" for i in range(4)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    collectors = [
        subprocess.Popen([sys.executable, "-m", "tests.store_workers", "collect", target, f"c{i}", "40"],
                         stdout=subprocess.PIPE, stderr=errors[i].open("w"), text=True, env=env, cwd=REPO)
        for i in range(4)
    ]
    consumer = worker("consume", target, str(log), "--batch", "6")
    for c in collectors:
        expect(c, "ready")
        expect(c, "recorded")  # mid-run: every collector is writing
    postgres.restart()  # pg_ctl restart -m fast: every session is cut, the server is away for a moment
    _finish(collectors, consumer)
    assert any("store_reconnecting" in e.read_text() for e in errors)  # the restart really cut them
    assert raw(target, "SELECT count(*) FROM groups") == [(160,)]  # nothing lost
    _check_run(target, log)
