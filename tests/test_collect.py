"""The collector with fakes: ScriptedPolicy, ExactMatchEvaluator, HashEmbedder and a real SQLite store.

Covers each variant end to end, evaluator failures, the staleness gate, version tagging, stopping,
a server that dies mid-run, reruns on the same run dir, and the command line's bad-input exits.
"""

from __future__ import annotations

import functools
import re
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import replace
from itertools import count
from pathlib import Path
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from evaluators.base import ExactMatchEvaluator
from exitagent.agent import SelfImprovingAgent
from exitagent.collect import CollectConfig, collect, main
from exitagent.curriculum.store import SQLiteStore
from exitagent.diversity import HashEmbedder
from exitagent.errors import ConfigError, ExitCode, ServerError
from exitagent.log import read_metrics
from exitagent.policy import ScriptedPolicy, render
from exitagent.prompts import DIVERGE_INSTRUCTION, IMPROVE_INSTRUCTION
from exitagent.recorder import Recorder
from exitagent.serving import engine
from exitagent.types import Message, PolicyVersion, Sample, StepKind, Task, Variant

pytestmark = pytest.mark.anyio

G = 4
REQUEST = re.compile(r"## Request:\n(.*?)\n\n## Current response:", re.DOTALL)
TASKS = [Task(f"t{i}", "math", f"What is {i} + {i}?", answer=str(2 * i)) for i in range(5)]


def answers(fail_every: int = 0) -> Any:
    """A script: the right answer every other response, distinct wrong ones in between (so groups
    have reward variance and distinct children), and "boom" (an evaluator failure) when asked."""
    counter = count()
    by_prompt = {t.prompt: t for t in TASKS}

    def script(messages: Sequence[Message]) -> str:
        n = next(counter)
        if fail_every and n % fail_every == fail_every - 1:
            return "boom"
        asked = REQUEST.search(messages[0].content)  # an iteration step: the request is inside its template
        task = by_prompt[asked.group(1) if asked else messages[0].content]
        return str(task.answer) if n % 2 == 0 else f"wrong {n}"

    return script


def config(tmp_path: Path, **overrides: Any) -> CollectConfig:
    values: dict[str, Any] = dict(run_dir=tmp_path, groups=8, group_size=G, concurrency=2, min_buffer=2,
                                  p_buffer=1.0, p_diverge=0.5, max_tokens=64, progress=False, poll_s=0.05)
    return CollectConfig(**{**values, **overrides})


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    return read_metrics(run_dir, "collect")


def assert_consistent(store: SQLiteStore) -> None:
    """Every group whole; every entry from a recorded group; every start an existing entry."""
    groups = store.fetch_groups()
    assert all(len(g.rollouts) == G for g in groups)
    assert all(r.sequences for g in groups for r in g.rollouts)
    ids = {g.id for g in groups}
    entries = {e.id: e for e in store.entries(live=False)}
    assert all(e.group_id in ids for e in entries.values())
    assert all(g.entry_id in entries for g in groups if g.entry_id is not None)


# variant -> (step kinds after the first group, iteration instructions the policy may see, diversity)
VARIANTS = {
    Variant.GRPO: ({StepKind.BASE}, set(), False),
    Variant.CURRICULUM: ({StepKind.REPLAY}, set(), False),
    Variant.IMPROVE: ({StepKind.IMPROVE}, {IMPROVE_INSTRUCTION}, False),
    Variant.DIVERGE: ({StepKind.IMPROVE, StepKind.DIVERGE}, {IMPROVE_INSTRUCTION, DIVERGE_INSTRUCTION}, False),
    Variant.EXIT: ({StepKind.IMPROVE, StepKind.DIVERGE}, {IMPROVE_INSTRUCTION, DIVERGE_INSTRUCTION}, True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
async def test_variants_end_to_end(tmp_path: Path, variant: Variant) -> None:
    kinds, instructions, diverse = VARIANTS[variant]
    policy = ScriptedPolicy(answers())
    cfg = config(tmp_path, variant=variant, groups=10, concurrency=1)  # one at a time: group 1 sees an empty buffer
    with SQLiteStore.in_run(tmp_path) as store:
        summary = await collect(cfg, policy, ExactMatchEvaluator(), store, TASKS, embedder=HashEmbedder())
        groups, entries = store.fetch_groups(), store.entries()
        assert_consistent(store)
    assert (summary.groups, summary.total_groups, summary.rollouts) == (10, 10, 10 * G)
    assert groups[0].step_kind is StepKind.BASE and groups[0].depth == 0
    # B_min = 2 and p = 1: every start comes from the buffer once it holds two entries (after the
    # first group; the second for "+ curriculum", whose replay entries are one per task)
    assert {g.step_kind for g in groups[2:]} == kinds
    assert summary.from_buffer == sum(g.entry_id is not None for g in groups) >= (0 if variant is Variant.GRPO else 8)
    assert (len(entries) == 0) == (variant is Variant.GRPO)
    seen = {i for call in policy.calls for i in (IMPROVE_INSTRUCTION, DIVERGE_INSTRUCTION) if i in call[-1].content}
    assert seen == instructions
    if instructions:  # an iterate is revised: deeper groups and deeper entries
        assert max(g.depth for g in groups) >= 1 and max(e.depth for e in entries) >= 1
    assert any(r.diversity != 1.0 for g in groups for r in g.rollouts) == diverse
    assert (tmp_path / "config" / "collect.json").exists() and (tmp_path / "config" / "curriculum.json").exists()


async def test_metrics_per_group(tmp_path: Path) -> None:
    with SQLiteStore.in_run(tmp_path) as store:
        await collect(config(tmp_path, variant=Variant.IMPROVE, groups=5), ScriptedPolicy(answers()),
                      ExactMatchEvaluator(), store, TASKS)
    rows = [m for m in metrics(tmp_path) if m["kind"] == "group"]
    assert len(rows) == 5
    assert all(m["reward_mean"] == 0.5 and m["group_score"] == 0.25 for m in rows)
    assert rows[-1]["buffer_size"] > 0 and rows[-1]["buffer_score_max"] == 0.25
    assert rows[-1]["replay_share"] > 0 and all(m["completion_tokens"] > 0 for m in rows)
    assert {"step_kind", "depth", "version", "staleness", "evaluator_failures_total"} <= rows[0].keys()


async def test_evaluator_failures_are_counted_and_never_trained_on(tmp_path: Path) -> None:
    evaluator = ExactMatchEvaluator(failing={"boom"})
    with SQLiteStore.in_run(tmp_path) as store:
        summary = await collect(config(tmp_path, groups=6), ScriptedPolicy(answers(fail_every=3)), evaluator,
                                store, TASKS, embedder=HashEmbedder())
        rollouts = [r for g in store.fetch_groups() for r in g.rollouts]
        entries = store.entries()
    failed = [r for r in rollouts if r.text == "boom"]
    assert failed and summary.failed_rollouts == len(failed)
    assert all(r.failed and r.reward is None and "scripted evaluator failure" in r.failure for r in failed)
    assert all(r.reward is not None for r in rollouts if r.text != "boom")  # no failure turned into a 0 elsewhere
    assert all(r.diversity == 1.0 for r in failed)
    assert "boom" not in {e.iterate for e in entries}
    assert metrics(tmp_path)[-1]["evaluator_failures_total"] == len(failed)


class ServedPolicy(ScriptedPolicy):
    """The fake with a served version, like ``OpenAIPolicy.policy_version`` reads from exitagent.serve."""

    served = PolicyVersion(0, "base")

    async def policy_version(self) -> PolicyVersion:
        return self.served


# (trainer step that consumed a group, version the server serves, whether collect must pause); max_staleness 2.
# Consumed by step 3: the trainer held version 2 and still trains version-0 groups, so collect must
# not pause for them (it did, and the two waited for each other).
GATE_CASES = {"within-limit": (3, 0, False), "trainer-ahead": (4, 0, True), "served-ahead": (None, 3, True)}


@pytest.mark.parametrize("case", list(GATE_CASES))
async def test_staleness_gate_pauses_until_the_trainer_catches_up(tmp_path: Path, case: str) -> None:
    consumed_step, served, pauses = GATE_CASES[case]
    cfg = config(tmp_path, variant=Variant.IMPROVE, groups=3, max_staleness=2)
    policy = ServedPolicy(answers())
    with SQLiteStore.in_run(tmp_path) as store:
        await collect(cfg, policy, ExactMatchEvaluator(), store, TASKS)  # three groups at version 0
        first = store.groups()[0]
        if consumed_step is not None:
            store.mark_consumed([first.id], consumed_step)
        policy.served = PolicyVersion.at_step(served)
        caught_up = []

        async def trainer() -> None:  # drops the stale groups after a while (as training.update would)
            await anyio.sleep(0.4)
            caught_up.append(time.time())
            store.drop_stale(min_version=1, step=3)

        with anyio.fail_after(10):  # a gate that never opens fails here rather than hanging
            async with anyio.create_task_group() as group:
                if pauses:
                    group.start_soon(trainer)
                summary = await collect(replace(cfg, groups=6), policy, ExactMatchEvaluator(), store, TASKS)
        new = store.groups()[3:]
    assert len(new) == summary.groups == 3
    if pauses:
        assert summary.paused_s >= 0.3 and all(g.created >= caught_up[0] for g in new)
    else:
        assert summary.paused_s == 0.0


def scripted_versions(steps: Sequence[int]) -> Any:
    """A script returning raw samples whose policy versions follow ``steps`` (e.g. a reload mid-group)."""
    it = iter(steps)

    def script(messages: Sequence[Message]) -> Sample:
        prompt = tuple(ord(c) for c in render(messages))
        return Sample("4", prompt, (52,), (-0.1,), "stop", PolicyVersion.at_step(next(it)))

    return script


async def test_group_is_tagged_with_its_oldest_sample_version(tmp_path: Path) -> None:
    tasks = [Task("t", "math", "What is 2 + 2?", answer="4")]
    cfg = config(tmp_path, variant=Variant.GRPO, groups=1, max_staleness=5)
    with SQLiteStore.in_run(tmp_path) as store:
        await collect(cfg, ScriptedPolicy(scripted_versions([3, 2, 3, 3])), ExactMatchEvaluator(), store, tasks)
        [group] = store.fetch_groups()
    assert group.version == PolicyVersion.at_step(2)
    assert [r.sequences[0].version.step for r in group.rollouts] == [3, 2, 3, 3]
    [row] = metrics(tmp_path)
    assert (row["version_step"], row["staleness"]) == (2, 1)  # the newest sample shows step 3 is served


async def test_rerun_continues_the_run(tmp_path: Path) -> None:
    with SQLiteStore.in_run(tmp_path) as store:
        first = await collect(config(tmp_path, groups=3), ScriptedPolicy(answers()), ExactMatchEvaluator(), store,
                              TASKS, embedder=HashEmbedder())
        second = await collect(config(tmp_path, groups=7), ScriptedPolicy(answers()), ExactMatchEvaluator(), store,
                               TASKS, embedder=HashEmbedder())
        idle = ScriptedPolicy(answers())
        third = await collect(config(tmp_path, groups=7), idle, ExactMatchEvaluator(), store, TASKS,
                              embedder=HashEmbedder())
        ids = [g.id for g in store.groups()]
        assert_consistent(store)
    assert (first.groups, second.groups, second.total_groups, third.groups) == (3, 4, 7, 0)
    assert len(set(ids)) == 7 and len({i.split("-")[0] for i in ids}) == 2  # one id prefix per invocation
    assert not idle.calls


async def test_collectors_share_a_run_with_one_seed_and_draw_apart(tmp_path: Path) -> None:
    """run --collectors N: one seed (the buffer's entries name tasks of its task set; a collector
    with another seed's tasks could not replay them), a different index each for different draws."""
    async def draws(run_dir: Path, index: int) -> list[str]:
        with SQLiteStore.in_run(run_dir) as store:
            await collect(config(run_dir, groups=6, collector_index=index, concurrency=1),
                          ScriptedPolicy(answers()), ExactMatchEvaluator(), store, TASKS, embedder=HashEmbedder())
            return [g.task_id for g in sorted(store.groups(), key=lambda g: g.created)]

    assert await draws(tmp_path / "a", 0) == await draws(tmp_path / "b", 0)  # reproducible
    assert await draws(tmp_path / "c", 1) != await draws(tmp_path / "d", 0)
    shared = tmp_path / "shared"
    with SQLiteStore.in_run(shared) as store:
        async with anyio.create_task_group() as both:
            for index in (0, 1):
                both.start_soon(functools.partial(collect, config(shared, groups=12, collector_index=index),
                                                  ScriptedPolicy(answers()), ExactMatchEvaluator(), store, TASKS,
                                                  embedder=HashEmbedder()))
        assert len(store.groups()) >= 12
        assert_consistent(store)


async def test_rerun_refuses_another_variant_or_task_set(tmp_path: Path) -> None:
    with SQLiteStore.in_run(tmp_path) as store:
        await collect(config(tmp_path, groups=2, variant=Variant.IMPROVE), ScriptedPolicy(answers()),
                      ExactMatchEvaluator(), store, TASKS)
        with pytest.raises(ConfigError, match="variant"):
            await collect(config(tmp_path, groups=4, variant=Variant.GRPO), ScriptedPolicy(answers()),
                          ExactMatchEvaluator(), store, TASKS)
        with pytest.raises(ConfigError, match="tasks not in this task set"):
            await collect(config(tmp_path, groups=4, variant=Variant.IMPROVE), ScriptedPolicy(answers()),
                          ExactMatchEvaluator(), store, [Task("other", "math", "?", answer="1")])


async def test_a_run_an_app_fed_is_collected_and_the_apps_entries_are_left_to_it(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path, group_fraction=0)  # the embedded agent fed this run first
    agent = SelfImprovingAgent(policy=ScriptedPolicy(lambda m: "42"), recorder=recorder)
    for request in ("What is 6 * 7?", "Name a prime."):
        reply = await agent.respond(request)
        await agent.feedback(reply.episode_id, 1.0)
    recorder.close()
    with SQLiteStore.in_run(tmp_path) as store:
        app_entries = {e.id for e in store.entries()}
        with capture_logs() as logs:  # groups=8: the run holds 8 groups at the end, the app's 2 included
            summary = await collect(config(tmp_path, min_buffer=1, concurrency=1), ScriptedPolicy(answers()),
                                    ExactMatchEvaluator(), store, TASKS, embedder=HashEmbedder())
        collected = [g for g in store.fetch_groups() if not g.id.startswith("app-")]
    assert len(app_entries) == 2 and (summary.groups, summary.total_groups) == (6, 8)
    (skipped,) = [line for line in logs if line["event"] == "app_entries_skipped"]
    assert skipped["app_tasks"] == 2
    assert {g.task_id for g in collected} <= {t.id for t in TASKS}
    assert not {g.entry_id for g in collected} & app_entries  # a draw of an app's entry started a base task
    assert summary.from_buffer >= 1  # the collector's own entries are still improved


async def test_stop_finishes_the_groups_in_flight(tmp_path: Path) -> None:
    stop = anyio.Event()
    script = answers()

    def stopping(messages: Sequence[Message]) -> str:
        if len(policy.calls) == 3:
            stop.set()
        return str(script(messages))

    policy = ScriptedPolicy(stopping)
    with SQLiteStore.in_run(tmp_path) as store:
        summary = await collect(config(tmp_path, groups=0, concurrency=3), policy, ExactMatchEvaluator(), store,
                                TASKS, embedder=HashEmbedder(), stop=stop)
        assert_consistent(store)
        assert len(store.groups()) == summary.groups
    assert summary.stopped and summary.groups == len(policy.calls) >= 3  # every group started was recorded


async def test_server_failure_mid_run_raises_and_leaves_whole_groups(tmp_path: Path) -> None:
    script = answers()

    def dying(messages: Sequence[Message]) -> str:
        if len(policy.calls) >= 4:
            raise ServerError("policy server http://127.0.0.1:1/v1 unreachable")
        return str(script(messages))

    policy = ScriptedPolicy(dying)
    with SQLiteStore.in_run(tmp_path) as store:
        with pytest.raises(ServerError, match="unreachable"):
            await collect(config(tmp_path, groups=20), policy, ExactMatchEvaluator(), store, TASKS,
                          embedder=HashEmbedder())
        assert_consistent(store)
        assert 1 <= len(store.groups()) <= 3


# --- the command line ---


def cli(tmp_path: Path, *extra: str) -> list[str]:
    return ["--run-dir", str(tmp_path), "--variant", "improve", "--num-tasks", "10", "--no-progress",
            "--log-level", "error", *extra]


def test_cli_store_from_a_newer_schema_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    SQLiteStore.in_run(tmp_path).close()
    with sqlite3.connect(tmp_path / "store.sqlite") as conn:
        conn.execute("UPDATE schema_version SET version = 99")
    assert main(cli(tmp_path, "--base-url", "http://127.0.0.1:1/v1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "schema version 99, newer" in err[0]
    assert not (tmp_path / "config").exists()  # nothing written into a run it cannot read


def test_cli_server_gone_exits_4_with_nothing_recorded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{engine.free_port()}/v1"
    assert main(cli(tmp_path, "--base-url", url, "--server-deadline-s", "1", "--groups", "3")) == ExitCode.UNAVAILABLE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("collect: policy server") and url in err[0]
    with SQLiteStore.in_run(tmp_path) as store:
        assert store.groups() == [] and store.entries() == []


def test_cli_bad_configuration_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(cli(tmp_path, "--domain", "chess")) == 2
    assert main(cli(tmp_path, "--p-buffer", "1.5")) == 2
    assert main(cli(tmp_path, "--levels", "add9")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "unknown domain 'chess'" in err[0] and "p_buffer" in err[1] and "add9" in err[2]


async def test_collect_pauses_while_enough_groups_wait_for_the_trainer(tmp_path: Path) -> None:
    cfg = config(tmp_path, variant=Variant.GRPO, groups=2, max_unconsumed=2, concurrency=1)
    policy = ServedPolicy(answers())
    with SQLiteStore.in_run(tmp_path) as store:
        await collect(cfg, policy, ExactMatchEvaluator(), store, TASKS)  # two groups waiting: the bound
        consumed_at = []

        async def trainer() -> None:
            await anyio.sleep(0.4)
            consumed_at.append(time.time())
            store.mark_consumed([g.id for g in store.fetch_groups()], 1)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as group:
                group.start_soon(trainer)
                summary = await collect(replace(cfg, groups=3), policy, ExactMatchEvaluator(), store, TASKS)
        new = store.groups()[2:]
    assert len(new) == 1 and summary.paused_s >= 0.3 and new[0].created >= consumed_at[0]
