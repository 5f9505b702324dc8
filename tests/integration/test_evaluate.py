"""K-step evaluation and the embedding API against the real CPU vLLM server (the packaged 135M model).

Kept small for two CPU cores: 4 held-out arithmetic tasks, K = 2, n = 2, 64 tokens per iterate.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from exitagent import SelfImprovingAgent
from exitagent.policy import TRAINING_TEMPERATURE, SamplingParams

pytestmark = pytest.mark.vllm

K, N, TASKS = 2, 2, 4


def test_command_line_writes_metrics_and_curve(served, tmp_path: Path) -> None:
    out = tmp_path / "eval" / "heldout.json"
    command = [sys.executable, "-m", "exitagent.evaluate", "--base-url", served.base_url, "--domain", "math",
               "--source", "arithmetic", "--split", "heldout", "--levels", "add1,add2,mul1", "--n-tasks", str(TASKS),
               "--steps", str(K), "--samples", str(N), "--max-tokens", "64", "--concurrency", "4",
               "--no-progress", "--log-level", "warning", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-2000:]
    body = json.loads(out.read_text())
    accuracy = body["accuracy_by_step"]
    assert len(accuracy) == K + 1 and all(0.0 <= a <= 1.0 for a in accuracy)
    assert body["delta_k"] == pytest.approx(accuracy[K] - accuracy[0])
    assert body["num_tasks"] == TASKS and body["num_trajectories"] == TASKS * N
    assert [s + f for s, f in zip(body["scored_by_step"], body["failures_by_step"], strict=True)] == [TASKS * N] * 3
    # the headline numbers agree with the per-task scores they summarise
    runs = [run for row in body["per_task"] for run in row["scores"]]
    assert len(runs) == TASKS * N and all(len(run) == K + 1 for run in runs)
    both = [(run[0], run[K]) for run in runs if run[0] is not None and run[K] is not None]
    assert body["net_corrections"] == sum(b > a for a, b in both) - sum(a > b for a, b in both)
    # every generated iterate came from the served policy (exitagent.serve tags each answer)
    generated = TASKS * N * (K + 1) - sum(body["context_full_by_step"])
    assert sum(body["policy_versions"].values()) == generated and "unknown" not in body["policy_versions"]
    assert body["config"]["steps"] == K and body["config"]["base_url"] == [served.base_url]  # repeatable flag
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the protocol's additions: intervals on every metric, and the greedy one-sample pass beside it
    assert len(body["intervals"]["accuracy_by_step"]) == K + 1 and body["intervals"]["tasks"] == TASKS
    assert body["intervals"]["delta_k"]["estimate"] == pytest.approx(body["delta_k"])
    assert body["config"]["temperature"] == TRAINING_TEMPERATURE
    assert body["greedy"]["samples"] == 1 and body["greedy"]["num_trajectories"] == TASKS
    assert f"Delta_{K}" in done.stderr and "95% intervals" in done.stderr and "greedy:" in done.stderr


def has_sum(text: str) -> float:
    return float("5" in text)


@pytest.mark.anyio
async def test_embedding_api_improves_twice(served) -> None:
    async with SelfImprovingAgent(served.base_url, params=SamplingParams(max_tokens=48)) as agent:
        result = await agent.improve("What is 2 + 3? Put your final answer in \\boxed{}.", steps=2, evaluator=has_sum)
    assert [it.step for it in result.iterates] == [0, 1, 2] and not result.stopped_early
    assert all(it.score in (0.0, 1.0) and it.finish_reason in ("stop", "length") for it in result.iterates)
    assert any(it.text.strip() for it in result.iterates)
    if any(it.score for it in result.iterates):
        assert result.best is not None and result.best.score == 1.0


def test_improve_sync_against_the_server(served) -> None:
    agent = SelfImprovingAgent(served.base_url, params=SamplingParams(max_tokens=32, temperature=0.0))
    first = agent.improve_sync("Name a primary colour.", steps=1)
    second = agent.improve_sync("Name a primary colour.", steps=1)  # a new event loop, new connections
    assert len(first.iterates) == len(second.iterates) == 2 and first.best is None
