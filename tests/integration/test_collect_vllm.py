"""Collect against the real CPU vLLM server: token-faithful groups, replay at depth >= 1, kill -9 and resume.

Kept small for two CPU cores: arithmetic tasks, G = 4, 64 tokens per response, B_min = 2 and
p = 1 so the buffer is replayed from the second round on.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from evaluators.math import MathEvaluator
from exitagent.client import OpenAIPolicy
from exitagent.collect import CollectConfig, collect, load_tasks
from exitagent.curriculum.store import SQLiteStore
from exitagent.types import StepKind, Variant

pytestmark = pytest.mark.vllm

G = 4
SMALL = dict(group_size=G, concurrency=2, max_tokens=64, min_buffer=2, p_buffer=1.0, p_diverge=0.5,
             levels="add1,add2", num_tasks=50)


def flags(run_dir: Path, base_url: str, groups: int) -> list[str]:
    return [sys.executable, "-m", "exitagent.collect", "--run-dir", str(run_dir), "--base-url", base_url,
            "--variant", "improve", "--groups", str(groups), "--no-progress", "--log-level", "warning",
            *[f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]]


def assert_consistent(store: SQLiteStore) -> list[str]:
    """Every group whole, every entry from a recorded group, every start an existing entry; the ids."""
    groups = store.fetch_groups()
    assert all(len(g.rollouts) == G and all(r.sequences for r in g.rollouts) for g in groups)
    ids = [g.id for g in groups]
    entries = {e.id: e for e in store.entries(live=False)}
    assert all(e.group_id in ids for e in entries.values())
    assert all(e.parent_id in entries for e in entries.values() if e.parent_id is not None)
    assert all(g.entry_id in entries for g in groups if g.entry_id is not None)
    return ids


def wait_for_groups(run_dir: Path, n: int, process: subprocess.Popen[Any], timeout_s: float = 120.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"collect exited early with {process.returncode}"
        if (run_dir / "store.sqlite").exists():
            with SQLiteStore.in_run(run_dir) as store:
                if len(found := store.groups()) >= n:
                    return len(found)
        time.sleep(0.2)
    raise TimeoutError(f"collect recorded fewer than {n} groups in {timeout_s} s")


@pytest.mark.anyio
async def test_collect_records_token_faithful_groups_and_iterates(served, tmp_path: Path) -> None:
    cfg = CollectConfig(run_dir=tmp_path, base_url=served.base_url, variant=Variant.EXIT, groups=6, progress=False,
                        **SMALL)  # type: ignore[arg-type]
    async with OpenAIPolicy(served.base_url) as policy, MathEvaluator() as evaluator:
        with SQLiteStore.in_run(tmp_path) as store:
            summary = await collect(cfg, policy, evaluator, store, load_tasks(cfg))  # the packaged MiniLM
            groups, entries = store.fetch_groups(), store.entries()
            assert_consistent(store)
    assert summary.groups == len(groups) == 6 and summary.failed_rollouts == 0
    served_version = served.policy()["version"]
    for group in groups:
        assert str(group.version) == served_version
        for rollout in group.rollouts:
            [sequence] = rollout.sequences
            sampled = [lp for lp, m in zip(sequence.logprobs, sequence.mask, strict=True) if m]
            assert 0 < len(sampled) <= 64 and all(lp <= 0 for lp in sampled)
            assert sequence.mask[0] == 0 and str(sequence.version) == served_version  # prompt first, masked
            assert rollout.reward in (0.0, 1.0) and "truncated" in rollout.components
    iterated = [g for g in groups if g.step_kind in (StepKind.IMPROVE, StepKind.DIVERGE)]
    assert iterated and all(g.depth >= 1 and g.entry_id is not None for g in iterated)
    assert max(e.depth for e in entries) >= 1 and summary.from_buffer == len(iterated)
    assert any(r.diversity != 1.0 for g in groups for r in g.rollouts)


def test_kill_9_leaves_a_consistent_store_and_the_rerun_continues(served, tmp_path: Path) -> None:
    process = subprocess.Popen(flags(tmp_path, served.base_url, 40), stderr=subprocess.DEVNULL)
    try:
        wait_for_groups(tmp_path, 2, process)
    finally:
        process.kill()
        process.wait()
    with SQLiteStore.in_run(tmp_path) as store:
        before = assert_consistent(store)
    rerun = subprocess.run(flags(tmp_path, served.base_url, len(before) + 2), capture_output=True, text=True,
                           timeout=180)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    with SQLiteStore.in_run(tmp_path) as store:
        after = assert_consistent(store)
    assert len(after) == len(set(after)) == len(before) + 2 and set(before) <= set(after)


def test_sigterm_finishes_in_flight_groups_and_exits_0(served, tmp_path: Path) -> None:
    process = subprocess.Popen(flags(tmp_path, served.base_url, 0), stderr=subprocess.PIPE, text=True)
    try:
        wait_for_groups(tmp_path, 1, process)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err[-2000:]
    assert "groups recorded" in err and "stopped early" in err
    with SQLiteStore.in_run(tmp_path) as store:
        assert len(assert_consistent(store)) >= 1
