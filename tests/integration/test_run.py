"""The main job (``python -m exitagent.run``): Ctrl-C mid-training stops every process, and the
same command continues the run to its report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from exitagent.curriculum.store import SQLiteStore
from exitagent.log import read_metrics
from exitagent.run import trained_seconds
from tests.user_env import write_module

pytestmark = pytest.mark.vllm

TINY = ["--eval-tasks", "3", "--eval-steps", "1", "--group-size", "2", "--groups-per-step", "2",
        "--max-tokens", "24", "--serve-flags=--enforce-eager"]


def _ours(run_dir: Path) -> list[psutil.Process]:
    """Processes still running for this run (serve, vLLM, collect, update, evaluate)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(str(run_dir) in part for part in process.info["cmdline"] or ()):
            found.append(process)
    return found


def _groups(run_dir: Path) -> int:
    return len(read_metrics(run_dir, "collect", "group"))


def test_ctrl_c_mid_training_stops_everything_and_the_same_command_resumes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "exitagent.run", "--run-dir", str(run_dir), *TINY]
    # A terminal's Ctrl-C signals the whole foreground process group: the orchestrator and its children.
    first = subprocess.Popen([*command, "--train-minutes", "10"], start_new_session=True, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 900
    while _groups(run_dir) < 2 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(2)
    assert first.poll() is None, "the run ended before training started"
    os.killpg(first.pid, signal.SIGINT)
    output, _ = first.communicate(timeout=600)
    assert first.returncode == 130, output[-3000:]
    assert "run the same command again" in output
    time.sleep(2)
    assert _ours(run_dir) == [], [p.info["cmdline"] for p in _ours(run_dir)]
    base = (run_dir / "eval" / "base.json").read_text()
    recorded, trained_before = _groups(run_dir), trained_seconds(run_dir)
    assert trained_before > 0

    second = subprocess.run([*command, "--train-minutes", "0.5"], capture_output=True, text=True, timeout=1200)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert (run_dir / "eval" / "base.json").read_text() == base  # kept, not measured again
    assert "evaluating the base policy" not in second.stdout
    assert _groups(run_dir) >= recorded  # the store carried over
    # the same budget continues: 30 s of training in all, not 30 s more
    assert trained_seconds(run_dir) == pytest.approx(max(trained_before, 30.0), abs=3.0)
    if trained_before < 30:
        assert f"continuing: {trained_before / 60:.1f} of 0.5 training minutes done" in second.stdout
    else:
        assert "training budget is spent" in second.stdout
    trained = json.loads((run_dir / "eval" / "trained.json").read_text())
    assert len(trained["accuracy_by_step"]) == 2
    assert (run_dir / "report.md").exists()
    assert _ours(run_dir) == []


def _running(processes: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for process in processes:
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            continue
    return alive


@pytest.mark.slow
def test_kill_9_of_the_orchestrator_leaves_no_process_and_the_same_command_resumes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "exitagent.run", "--run-dir", str(run_dir), *TINY]
    first = subprocess.Popen([*command, "--train-minutes", "10"], start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 900
    while _groups(run_dir) < 1 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(2)
    assert first.poll() is None, "the run ended before training started"
    children = psutil.Process(first.pid).children(recursive=True)  # serve, vLLM and its workers, collect, update
    names = " ".join(" ".join(p.cmdline()) for p in children)
    assert all(name in names for name in ("exitagent.serve", "vllm", "exitagent.collect", "training.update")), names
    first.kill()
    first.wait()
    killed = time.monotonic()
    while _running(children) and time.monotonic() - killed < 10:
        time.sleep(0.2)
    print(f"every process of the run gone {time.monotonic() - killed:.1f} s after kill -9")
    assert not _running(children), [p.cmdline() for p in _running(children)]
    assert _ours(run_dir) == []

    second = subprocess.run([*command, "--train-minutes", "0.5"], capture_output=True, text=True, timeout=1200)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "evaluating the base policy" not in second.stdout  # the first run's base evaluation is kept
    assert (run_dir / "report.md").exists()
    assert _ours(run_dir) == []


def test_a_user_environment_runs_through_the_main_job(tmp_path: Path) -> None:
    """``run --domain MODULE:ENV`` with a module outside the package (two tools, a reward on the
    episode's state): its groups train, both policies are evaluated on its tasks, the report names them."""
    modules = tmp_path / "modules"
    modules.mkdir()
    domain, run_dir = write_module(modules), tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(modules), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "exitagent.run", "--run-dir", str(run_dir), "--domain", domain,
                           *TINY, "--max-tokens", "48", "--train-minutes", "1"],
                          env=env, capture_output=True, text=True, timeout=1200, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"held-out {domain}" in done.stdout  # its own tasks, not arithmetic
    with SQLiteStore.in_run(run_dir) as store:
        groups = store.groups()
    assert groups and all(g.task_id.startswith("note-") for g in groups)  # the environment's tasks
    for name in ("base", "trained"):
        result = json.loads((run_dir / "eval" / f"{name}.json").read_text())
        assert result["config"]["domain"] == domain and len(result["accuracy_by_step"]) == 2
        assert all(row["id"].startswith("note-") for row in result["per_task"])
    assert f"Held-out {domain}:" in (run_dir / "report.md").read_text()
    assert _ours(run_dir) == []
