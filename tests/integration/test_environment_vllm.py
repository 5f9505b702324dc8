"""A user's environment from a module outside the package, through collect and evaluate against
the real CPU vLLM server: token-faithful groups, per-turn buffer entries, the evaluation curve.

Kept small for two CPU cores: 3 groups of 2, 48 tokens a turn, 3 turns (every message must be an
action, so each episode runs its turns and leaves a prefix per turn in the buffer).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from exitagent.curriculum.store import SQLiteStore
from tests.user_env import write_module

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
G, GROUPS, TURNS = 2, 3, 3


def run(command: list[str], modules: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(modules), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", *command, "--no-progress", "--log-level", "warning"], env=env,
                          capture_output=True, text=True, timeout=400, stdin=subprocess.DEVNULL)


def test_a_user_environment_collects_and_evaluates(served, tmp_path: Path) -> None:
    modules = tmp_path / "modules"
    modules.mkdir()
    domain = write_module(modules)
    collect = run(["exitagent.collect", "--run-dir", str(tmp_path / "run"), "--base-url", served.base_url,
                   "--domain", domain, "--variant", "exit", "--groups", str(GROUPS), "--group-size", str(G),
                   "--concurrency", "1", "--max-tokens", "48", "--max-turns", str(TURNS), "--min-buffer", "1",
                   "--p-buffer", "0"], modules)
    assert collect.returncode == 0, collect.stderr[-2000:]
    served_version = served.policy()["version"]
    with SQLiteStore.in_run(tmp_path / "run") as store:
        groups, entries = store.fetch_groups(), store.entries(live=False)
    assert len(groups) == GROUPS and all(len(g.rollouts) == G for g in groups)
    for rollout in (r for g in groups for r in g.rollouts):
        assert rollout.sequences and rollout.failure == ""
        for sequence in rollout.sequences:  # prompt first and masked; tool results masked between turns
            sampled = [lp for lp, m in zip(sequence.logprobs, sequence.mask, strict=True) if m]
            assert sequence.mask[0] == 0 and sampled and all(lp <= 0 for lp in sampled)
            assert str(sequence.version) == served_version
        assert rollout.reward in (0.0, 1.0)
    assert {e.start_turn for e in entries} >= {0, 1}  # later turns' prefixes are buffer entries too

    out = tmp_path / "eval" / "notes.json"
    evaluate = run(["exitagent.evaluate", "--base-url", served.base_url, "--domain", domain, "--n-tasks", "2",
                    "--steps", "1", "--samples", "2", "--max-tokens", "48", "--max-turns", "2", "--out", str(out)],
                   modules)
    assert evaluate.returncode == 0, evaluate.stderr[-2000:]
    body = json.loads(out.read_text())
    assert len(body["accuracy_by_step"]) == 2 and body["num_trajectories"] == 4
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
