"""The MLE domain end to end against the real CPU vLLM server (the packaged 135M model).

``evaluate --domain mle``: two offline competitions, a greedy search of K = 2 steps each, programs
run in bubblewrap. ``collect --domain mle``: two groups of two into a fresh run. Low scores are
expected from a model this small; what must hold is the path: prompts fit, responses are run and
graded, the JSON and the store hold what they should.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from exitagent.curriculum.store import SQLiteStore

pytestmark = pytest.mark.vllm

K, COMPETITIONS = 2, ("iris-species", "diabetes-progression")


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "EXITAGENT_HOME": str(home)}  # competitions are prepared there, not in ~/.cache


def test_evaluate_and_collect_mle(served, tmp_path: Path) -> None:
    out = tmp_path / "eval" / "mle.json"
    command = [sys.executable, "-m", "exitagent.evaluate", "--base-url", served.base_url, "--domain", "mle",
               "--source", "offline", "--split", "all", "--levels", ",".join(COMPETITIONS), "--steps", str(K),
               "--samples", "1", "--max-tokens", "384", "--eval-timeout-s", "20", "--concurrency", "2",
               "--no-progress", "--log-level", "warning", "--keep-texts", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=480, stdin=subprocess.DEVNULL,
                          env=_env(tmp_path / "home"))
    assert done.returncode == 0, done.stderr[-3000:]
    body = json.loads(out.read_text())
    print("evaluate --domain mle:", json.dumps({k: body[k] for k in ("accuracy_by_step", "domain_metrics")}))
    best = body["accuracy_by_step"]
    assert len(best) == K + 1 and all(b is not None and 0.0 <= b <= 1.0 for b in best)
    assert best == sorted(best)  # best-so-far never falls
    assert sorted(row["id"] for row in body["per_task"]) == sorted(COMPETITIONS)
    metrics = body["domain_metrics"]
    for key in ("crash_rate", "format_failure_rate", "valid_submission_rate", "debug_step_rate",
                *(f"attempt_score_step_{k:02d}" for k in range(K + 1))):
        assert key in metrics and 0.0 <= metrics[key] <= 1.0, key
    assert sum(body["policy_versions"].values()) == len(COMPETITIONS) * (K + 1) - sum(body["context_full_by_step"])
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "exitagent.collect", "--run-dir", str(run_dir), "--base-url", served.base_url,
               "--domain", "mle", "--task-source", "offline", "--task-split", "all", "--levels", COMPETITIONS[0],
               "--variant", "improve", "--groups", "2", "--group-size", "2", "--concurrency", "1",
               "--min-buffer", "1", "--p-buffer", "1.0", "--max-tokens", "384", "--eval-timeout-s", "20",
               "--no-progress", "--log-level", "warning"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                          env=_env(tmp_path / "home"))
    assert done.returncode == 0, done.stderr[-3000:]
    with SQLiteStore.in_run(run_dir) as store:
        stored = store.fetch_groups()  # unconsumed groups, with their rollouts
    print("collect --domain mle:", [(g.step_kind.value, [r.reward for r in g.rollouts]) for g in stored])
    assert len(stored) == 2 and all(len(g.rollouts) == 2 for g in stored)
    for group in stored:
        for rollout in group.rollouts:
            assert rollout.sequences and rollout.reward is not None and 0.0 <= rollout.reward <= 1.0
            assert {"errored", "format_error"} <= set(rollout.components)
