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

from evaluators.base import ExactMatchEvaluator
from exitagent.collect import collect
from exitagent.collect import main as collect_main
from exitagent.curriculum import __main__ as curriculum_cli
from exitagent.curriculum.store_url import URL_FILENAME, open_run_store, open_store, pin_run_store, redact, schema_for
from exitagent.diversity import HashEmbedder
from exitagent.errors import ConfigError, ExitCode, StoreUnavailable
from exitagent.policy import ScriptedPolicy
from exitagent.serving import engine
from exitagent.types import StepKind, Variant
from tests.postgres import PASSWORD, Cluster
from tests.test_collect import TASKS, answers
from tests.test_collect import assert_consistent as collect_consistent
from tests.test_collect import cli as collect_cli
from tests.test_collect import config as collect_config
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


def test_a_url_without_host_takes_it_from_the_environment(postgres: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """``postgresql:///DB?schema=S`` leaves host, port, user and password to libpq's PG* variables
    (what pg_virtualenv sets: scripts/rehearse_cluster.sh); a URL libpq cannot parse is one error."""
    for name, value in {"PGHOST": str(postgres.socket_dir), "PGPORT": str(postgres.port), "PGUSER": "postgres"}.items():
        monkeypatch.setenv(name, value)
    assert redact("postgresql:///postgres?schema=env") == "postgresql:///postgres?schema=env"
    with open_store("postgresql:///postgres?schema=env") as store:
        assert store.groups() == []
    with pytest.raises(ConfigError, match="not a valid PostgreSQL URL"):
        open_store("postgresql:///postgres?schema=x&notakey=1", connect_timeout_s=3)


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
    assert "groups: 1 (" in capsys.readouterr().out
    assert schema_for(run) == "my_run_1"
    (run / URL_FILENAME).write_text("mysql://somewhere/else\n")
    assert curriculum_cli.main(["show", str(run)]) == 2  # hostile URL file: one line, no traceback
    assert curriculum_cli.main(["show", str(run), "--store", "mysql://x/y"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert "must hold one postgresql:// URL" in errors[-2] and "unsupported store URL" in errors[-1]


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
    """Collectors run until killed; six times one process (a collector or the trainer) is killed
    with SIGKILL at a random moment and started again; at the end every collector is killed too."""
    rng = random.Random(16)
    log = tmp_path / "consumed.log"
    open_store(target).close()
    names = [f"c{i}" for i in range(4)]
    collectors = {name: worker("collect", target, name, "-1", "--tokens", "2000") for name in names}
    consumer = worker("consume", target, str(log), "--batch", "6")
    for _ in range(6):
        time.sleep(rng.uniform(0.3, 1.5))
        victim = rng.choice([*names, "trainer"])
        process = consumer if victim == "trainer" else collectors[victim]
        assert process.poll() is None, f"{victim} died on its own"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        assert_consistent(target, group_size=G)
        if victim == "trainer":
            consumer = worker("consume", target, str(log), "--batch", "6")
        else:
            fresh = f"{victim}r{rng.randrange(10**6)}"  # a restarted collector has a new session id
            collectors[victim] = worker("collect", target, fresh, "-1", "--tokens", "2000")
    for process in collectors.values():
        assert process.poll() is None
        os.kill(process.pid, signal.SIGKILL)
    assert consumer.wait(timeout=120) == 0  # it stops after 3 s without new groups
    assert raw(target, "SELECT count(*) FROM groups")[0][0] > 20
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


@pytest.mark.anyio
async def test_collect_runs_the_exit_curriculum_on_postgres(target: str, tmp_path: Path) -> None:
    """The real collector (scripted policy, real evaluator) with two workers on a PostgreSQL store."""
    cfg = collect_config(tmp_path, variant=Variant.EXIT, groups=10)
    with open_store(target) as store:
        summary = await collect(cfg, ScriptedPolicy(answers()), ExactMatchEvaluator(), store, TASKS,
                                embedder=HashEmbedder())
        collect_consistent(store)
        assert summary.total_groups == 10 and summary.from_buffer >= 6
        assert {g.step_kind for g in store.groups()[2:]} <= {StepKind.IMPROVE, StepKind.DIVERGE}


def test_collect_cli_keeps_the_password_out_and_says_why_it_cannot_log_in(
        postgres: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wrong = postgres.url(tcp=True, password="wrong-secret")
    assert collect_main(collect_cli(tmp_path, "--store", wrong)) == 2
    err = capsys.readouterr().err
    assert "password authentication failed" in err.splitlines()[-1] and "wrong-secret" not in err
    # The right password on the command line: a warning, and the saved config holds it redacted.
    url = postgres.url(tcp=True, password=PASSWORD)
    server_gone = f"http://127.0.0.1:{engine.free_port()}/v1"
    assert collect_main(collect_cli(tmp_path, "--store", url, "--base-url", server_gone, "--server-deadline-s", "1",
                                    "--groups", "2")) == ExitCode.UNAVAILABLE  # docs/exit-codes.md
    assert "password" in capsys.readouterr().err
    saved = (tmp_path / "config" / "collect.json").read_text()
    assert PASSWORD not in saved and "postgres:***@127.0.0.1" in saved
