"""Tool use against the real CPU vLLM server: collect starts groups at turns > 0, evaluate runs end to end.

BFCL's function schemas take 1.5k to 4k tokens, so this module starts its own server with an
8192-token context (the session's ``served`` has 2048). ``EXITAGENT_TEST_SERVE_DIR`` reuses a
running serve instead, as for ``served``; it must have been started with ``--max-model-len 8192``.
Kept small for two CPU cores: 48-token actions, G = 4, six groups of at most 3 turns; 2 evaluation
tasks with a 4-turn budget (the 135M model writes no actions, so it would use the whole budget).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from exitagent.curriculum.store import SQLiteStore
from exitagent.curriculum.view import summarize
from exitagent.serving.launch import ServeProcess

pytestmark = pytest.mark.vllm

CONTEXT = "8192"


@pytest.fixture(scope="module")
def tool_served(tmp_path_factory: pytest.TempPathFactory, serve_factory):
    reuse = os.environ.get("EXITAGENT_TEST_SERVE_DIR")
    if reuse:
        directory = Path(reuse)
        url = (directory / "url").read_text().strip()
        yield ServeProcess(subprocess.Popen(["true"], text=True), url, directory / "weights", directory / "log")
        return
    server = serve_factory(tmp_path_factory.mktemp("tool_served"), "--max-model-len", CONTEXT)
    yield server
    if server.process.poll() is None:
        server.stop()


def run(command: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_collect_records_groups_that_start_at_later_turns(tool_served, tmp_path: Path) -> None:
    run([sys.executable, "-m", "exitagent.collect", "--domain", "tool_use", "--task-source", "base",
         "--task-split", "train", "--run-dir", str(tmp_path), "--base-url", tool_served.base_url,
         "--variant", "improve", "--groups", "6", "--group-size", "4", "--concurrency", "2", "--max-tokens", "48",
         "--max-turns", "3",
         "--max-context", CONTEXT, "--min-buffer", "1", "--p-buffer", "1.0", "--kappa", "0", "--seed", "3",
         "--no-progress", "--log-level", "warning"], timeout=900)
    with SQLiteStore.in_run(tmp_path) as store:
        groups, entries = store.fetch_groups(), store.entries()
    summary = summarize(entries, groups)
    print(f"\nbuffer start turns {summary.start_turns}, groups {len(groups)}, "
          f"group start turns {sorted(g.start_turn for g in groups)}")
    assert len(groups) == 6 and all(len(g.rollouts) == 4 for g in groups)
    for group in groups:
        for rollout in group.rollouts:
            assert rollout.reward in (0.0, 1.0) and rollout.components["requests"] == 1  # the first request only
            assert rollout.sequences and all(s.mask[0] == 0 for s in rollout.sequences)  # token-faithful
    assert max(summary.start_turns) > 0  # every per-turn prefix of a history is an entry
    later = [g for g in groups if g.start_turn > 0]
    assert later and all(g.entry_id is not None for g in later)  # and groups start from them
    plot = tmp_path / "curriculum.png"
    shown = run([sys.executable, "-m", "exitagent.curriculum", "show", str(tmp_path), "--plot", str(plot)], 120)
    assert "start turn: 0:" in shown.stdout and plot.read_bytes()[:4] == b"\x89PNG"


def test_evaluate_runs_every_request_on_the_test_split(tool_served, tmp_path: Path) -> None:
    out = tmp_path / "tool_use.json"
    run([sys.executable, "-m", "exitagent.evaluate", "--domain", "tool_use", "--source", "bfcl", "--split", "test",
         "--n-tasks", "2", "--steps", "1", "--samples", "1", "--temperature", "0", "--max-tokens", "32",
         "--max-turns", "4",
         "--max-context", CONTEXT, "--base-url", tool_served.base_url, "--no-progress", "--log-level", "warning",
         "--keep-texts", "--out", str(out)], timeout=900)
    body = json.loads(out.read_text())
    print(f"\ndomain metrics {body['domain_metrics']}")
    assert body["num_tasks"] == 2 and len(body["accuracy_by_step"]) == 2
    metrics = body["domain_metrics"]
    assert 0.0 <= metrics["first_request_accuracy"] <= 1.0 and metrics["total_return"] >= 0.0
    assert body["score"] == "first_request_accuracy"  # the paper's headline; all-requests beside it
    assert body["accuracy_by_step"][0] == metrics["first_request_accuracy"]
    assert len(body["secondary"]["all_requests_accuracy"]["accuracy_by_step"]) == 2
    assert 0.0 <= metrics["revisions_changed"] <= 1.0  # K = 1: every action of the k = 1 episode revised once
    for row in body["per_task"]:
        record = json.loads(row["texts"][0][0])
        assert record["entry"] == row["id"] and record["actions"]  # the model acted, and its calls were judged
        assert len(record["calls"]) >= 1 and set(row["metrics"]) >= {"first_request_accuracy", "total_return"}
