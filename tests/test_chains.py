"""The naive control ``chains`` (exitagent/curriculum/chains.py): a fake policy at the policy seam, the
real math evaluator and a real SQLite store, through ``collect`` as a run uses it."""

from __future__ import annotations

import argparse
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any

import pytest

from evaluators.math import MathEvaluator
from exitagent.collect import CollectConfig, collect, main
from exitagent.config import add_arguments, from_args, parse_args
from exitagent.curriculum import Start, chains
from exitagent.curriculum.store import SQLiteStore
from exitagent.errors import ExitCode
from exitagent.log import read_metrics
from exitagent.policy import DEFAULT_PARAMS, SamplingParams, ScriptedPolicy
from exitagent.prompts import IMPROVE_INSTRUCTION
from exitagent.types import Message, Sample, StepKind, Task, Variant
from exitagent.variants import summarise, write_table
from tests.test_variants_table import fake_run

pytestmark = pytest.mark.anyio

G, MAX_DEPTH = 4, 3
TASKS = [Task(f"t{i}", "math", f"What is {i} + {i}?", answer=str(2 * i)) for i in range(5)]
REQUEST = re.compile(r"## Request:\n(.*?)\n\n## Current response:", re.DOTALL)


def script() -> Any:
    """Every response distinct ("call N"), right every other time, so each iterate can be traced."""
    counter, by_prompt = count(), {t.prompt: t for t in TASKS}

    def answer(messages: Sequence[Message]) -> str:
        n = next(counter)
        asked = REQUEST.search(messages[0].content)
        task = by_prompt[asked.group(1) if asked else messages[0].content]
        return f"call {n}: \\boxed{{{task.answer if n % 2 == 0 else -1}}}"

    return answer


Request = tuple[int, list[Message], list[Sample]]  # n, the prompt, what came back


@dataclass
class RecordingPolicy:
    """The policy seam: ``ScriptedPolicy``'s answers, with every request's n and samples kept."""

    inner: ScriptedPolicy
    requests: list[Request] = field(default_factory=list)

    @property
    def max_context(self) -> int:
        return self.inner.max_context

    def estimate_tokens(self, text: str) -> int:
        return self.inner.estimate_tokens(text)

    async def sample(self, messages: Sequence[Message], *, n: int = 1, params: SamplingParams = DEFAULT_PARAMS,
                     tools: Sequence[dict[str, Any]] | None = None) -> list[Sample]:
        samples = await self.inner.sample(messages, n=n, params=params, tools=tools)
        self.requests.append((n, list(messages), samples))
        return samples


async def collect_chains(run_dir: Path, groups: int = 24, seed: int = 0) -> tuple[RecordingPolicy, list[Any]]:
    cfg = CollectConfig(run_dir=run_dir, variant=Variant.CHAINS, chain_max_depth=MAX_DEPTH, groups=groups,
                        group_size=G, concurrency=1, max_tokens=64, progress=False, poll_s=0.05, seed=seed)
    policy = RecordingPolicy(ScriptedPolicy(script()))
    async with MathEvaluator(workers=1) as evaluator:
        with SQLiteStore.in_run(run_dir) as store:
            await collect(cfg, policy, evaluator, store, TASKS)
            recorded = sorted(store.fetch_groups(), key=lambda g: g.id)  # with rollouts
            assert store.entries(live=False) == []  # no buffer for this variant
    return policy, recorded


def per_group(policy: RecordingPolicy) -> list[tuple[list[Request], Request]]:
    """The requests of each group in order (concurrency 1): its chain's single samples, then the group."""
    out: list[tuple[list[Request], Request]] = []
    chain: list[Request] = []
    for request in policy.requests:
        if request[0] == G:
            out.append((chain, request))
            chain = []
        else:
            assert request[0] == 1, "a chain step asks for one sample"
            chain.append(request)
    assert not chain
    return out


async def test_chains_group_improves_the_last_iterate_of_k_single_samples(tmp_path: Path) -> None:
    policy, groups = await collect_chains(tmp_path)
    requests = per_group(policy)
    depths = [g.depth for g in groups]
    assert len(requests) == len(groups) == 24
    assert set(depths) == set(range(MAX_DEPTH + 1))  # drawn in range, every depth reached
    for group, (chain, (_, prompt, _)) in zip(groups, requests, strict=True):
        assert len(chain) == group.depth  # exactly K single-sample requests before the group
        assert group.step_kind is (StepKind.IMPROVE if group.depth else StepKind.BASE)
        assert group.entry_id is None and group.variant is Variant.CHAINS and len(group.rollouts) == G
        task = next(t for t in TASKS if t.id == group.task_id)
        if not chain:
            assert prompt == [Message("user", task.prompt)]
            continue
        assert chain[0][1] == [Message("user", task.prompt)]  # the chain begins with a first attempt
        iterates = [samples[0].text for _, _, samples in chain]
        for (_, step, _), previous in zip(chain[1:], iterates, strict=False):  # each step sees the one before
            assert previous in step[0].content and IMPROVE_INSTRUCTION in step[0].content
        # the group's prompt: one message, the request and the LAST iterate only
        assert len(prompt) == 1 and iterates[-1] in prompt[0].content and task.prompt in prompt[0].content
        assert not any(earlier in prompt[0].content for earlier in iterates[:-1])
    scored = [r.reward for g in groups for r in g.rollouts]
    assert set(scored) == {0.0, 1.0}  # the real evaluator graded them


async def test_chain_tokens_count_in_the_collect_metrics(tmp_path: Path) -> None:
    policy, groups = await collect_chains(tmp_path, groups=12)
    rows = [r for r in read_metrics(tmp_path, "collect") if r["kind"] == "group"]
    by_id = {r["group_id"]: r for r in rows}
    for group, (chain, (_, _, samples)) in zip(groups, per_group(policy), strict=True):
        chain_tokens = sum(len(s.completion_ids) for _, _, got in chain for s in got)
        row = by_id[group.id]
        assert row["completion_tokens"] == chain_tokens + sum(len(s.completion_ids) for s in samples)
        assert row["depth"] == group.depth and row["step_kind"] == group.step_kind.value
        assert row["replay_share"] == 0
    assert any(chain for chain, _ in per_group(policy))


async def test_depth_draws_follow_the_seed(tmp_path: Path) -> None:
    _, first = await collect_chains(tmp_path / "a", groups=12, seed=3)
    _, again = await collect_chains(tmp_path / "b", groups=12, seed=3)
    _, other = await collect_chains(tmp_path / "c", groups=12, seed=4)
    assert [g.depth for g in first] == [g.depth for g in again]
    assert [(g.task_id, g.depth) for g in first] != [(g.task_id, g.depth) for g in other]


async def test_a_chain_ends_where_the_next_prompt_leaves_no_room() -> None:
    long = "x" * 300  # each iterate: the improve prompt around it leaves < 16 tokens of a 400-token context
    policy = RecordingPolicy(ScriptedPolicy(lambda _: long, max_context=400))
    task = TASKS[0]

    class Always(random.Random):
        def randint(self, a: int, b: int) -> int:
            return b

    start = await chains.grow(policy, Start(task, StepKind.BASE), Always(), 3, lambda _: SamplingParams(max_tokens=300))
    assert len(policy.requests) == 1  # the first attempt; its improve prompt would not fit
    assert start.depth == 0 and start.step_kind is StepKind.BASE and start.messages() == (Message("user", task.prompt),)
    assert chains.chain_tokens(start) == 300  # generated, so counted, though nothing improves it


def test_command_line_parses_chains_and_refuses_what_it_cannot_run(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, CollectConfig)
    cfg = from_args(CollectConfig, parse_args(
        parser, ["--run-dir", str(tmp_path), "--variant", "chains", "--chain-max-depth", "2"], "collect"))
    assert (cfg.variant, cfg.chain_max_depth) == (Variant.CHAINS, 2)
    for flags, message in ((["--chain-max-depth", "-1"], "chain-max-depth must be >= 0"),
                           (["--domain", "tool_use"], "single-turn domains only")):
        assert main(["--run-dir", str(tmp_path), "--variant", "chains", *flags]) == ExitCode.USAGE
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_variants_table_shows_the_control_after_the_five(tmp_path: Path) -> None:
    runs = {variant: [fake_run(tmp_path, variant, 0, [0.3, 0.2], curve)]
            for variant, curve in ((Variant.CHAINS, [0.4, 0.3]), (Variant.GRPO, [0.4, 0.4]))}
    text = write_table(tmp_path, summarise(runs)).read_text()
    rows = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")][1:]
    assert rows == ["base model", "GRPO", "naive K-step chains (control)"]
