"""Hostile model output through the real tool-use path: each action ends as an error the model sees.

The policy is the scripted fake; everything after it is real: ``parse_action``, the BFCL toolbox
(``render_call``), the safe executor on real API instances, the checker, and ``collect`` with a
real SQLite store. Covers what crashed the collector before (a >4300-digit integer, deep brackets,
a deep expression for ``ast.unparse``, a name that injected a second call, unbounded Math API
sizes, a leaked decimal precision) and generated input (random text, mutated actions).
"""

from __future__ import annotations

import decimal
import json
import random
import time
from collections.abc import Sequence
from itertools import count
from pathlib import Path
from typing import Any

import mpmath
import pytest

from evaluators.base import ExactMatchEvaluator
from evaluators.tool_use import ToolUseEvaluator
from evaluators.worlds.bfcl.calls import execute
from evaluators.worlds.bfcl.env import BfclEnv, get_entry
from evaluators.worlds.bfcl.toolbox import REFUSED_CALL, BfclToolbox
from exitagent.collect import CollectConfig, collect
from exitagent.curriculum import Start
from exitagent.curriculum.store import SQLiteStore
from exitagent.diversity import HashEmbedder
from exitagent.domains import DomainSettings, TaskSpec, get_domain
from exitagent.domains.tool_use import ToolUseDomain, task_of
from exitagent.log import read_metrics
from exitagent.policy import SamplingParams, ScriptedPolicy
from exitagent.tools import parse_action
from exitagent.types import Message, PolicyVersion, Sample, StepKind, StopReason, Task, Variant

pytestmark = pytest.mark.anyio

ENTRY = "multi_turn_base_28"  # GorillaFileSystem (rm) and MathAPI
VICTIM = "data"  # in the entry's working directory (rm removes it)
BIG = 3_000_000  # ScriptedPolicy counts a token per character
PARAMS = SamplingParams(max_tokens=200_000)


def tool(payload: str) -> str:
    return f"<tool>{payload}</tool>"


def call(name: Any, **arguments: Any) -> str:
    return tool(json.dumps({"name": name, "arguments": arguments}))


HOSTILE = [
    tool('{"name": "add", "arguments": {"a": ' + "9" * 5000 + ', "b": 1}}'),  # int str-digits limit
    tool('{"name": "add", "arguments": {"a": 1' + "0" * 150 + ', "b": 1}}'),  # past the digit bound
    tool("[" * 50_000 + "]" * 50_000),  # RecursionError in json
    tool('{"name": "add", "arguments": {"a": ' + "[" * 40 + "]" * 40 + ', "b": 1}}'),
    tool('{"name": "echo", "arguments": {"content": "' + "x" * 40_000 + '", "file_name": "a"}}'),  # too long
    tool('{"name": "add", "arguments": {"a": NaN, "b": 1}}'),
    tool('{"name": "add", "arguments": {"a": -Infinity, "b": 1}}'),
    tool('{"name": "add", "arguments": {"a": 1e999, "b": 1}}'),
    call(f"rm(file_name='{VICTIM}')#"),  # injected a second call before
    call("cd", **{f"folder='.') or rm(file_name='{VICTIM}'": 1}),
    call("\uff52\uff4d", file_name=VICTIM),  # fullwidth "rm": NFKC would make it rm
    call("import"), call("cd", **{"lambda": "x"}), call("cd", **{"": "x"}), call("caf\u00e9"),
    tool('{"name": 5, "arguments": {}}'), tool('{"name": "cd", "arguments": [1]}'), tool("[1, 2, 3]"),
    tool(json.dumps([{"name": "pwd", "arguments": {}}] * 200)),  # more calls than MAX_CALLS
    call("power", base=10, exponent=10**7),  # 10 s before
    call("logarithm", value=10, base=2, precision=200_000),  # did not finish in 20 s
    call("round_number", number=5, decimal_places=-(10**7)),
    call("cd", folder="x" * 20_000 + "'"),
    "<tool>" * 3000 + "{",
]


def is_error(message: Message) -> bool:
    return message.content.startswith(("error:", "Error during execution:", "{\"error\""))  # ours, or the API's


async def roll(actions: Sequence[str]) -> tuple[list[Message], Any]:
    """One rollout of ``actions`` (one per turn, then <TASK_ERROR>) on ENTRY; its tool messages and rollout."""
    entry = get_entry(ENTRY)
    policy = ScriptedPolicy([*actions, "<TASK_ERROR>"], max_context=BIG)
    async with ToolUseEvaluator() as evaluator:
        rolled = await ToolUseDomain().roll_out(Start(task_of(entry), StepKind.BASE), policy, evaluator, group_size=1,
                                                params=PARAMS,
                                                settings=DomainSettings(max_context=BIG, max_turns=len(actions) + 1))
    rollout = rolled.rollouts[0]
    return [m for m in rollout.episode.messages if m.role == "tool"], rollout


async def test_each_hostile_action_is_an_error_the_model_sees() -> None:
    assert VICTIM in BfclEnv.fresh(get_entry(ENTRY)).run("ls()").output
    prec, mp_prec, began = decimal.getcontext().prec, mpmath.mp.prec, time.monotonic()
    results, rollout = await roll(HOSTILE)
    assert time.monotonic() - began < 20  # the heavy calls were refused, not computed
    assert rollout.episode.stop_reason is StopReason.GAVE_UP and rollout.reward == 0.0
    turns = rollout.episode.turns
    assert len(turns) == len(HOSTILE) + 1
    for action, turn in zip(HOSTILE, turns, strict=False):
        assert turn.tool_results and is_error(turn.tool_results[0]), (action[:80], turn.tool_results)
        # one call per message (the list of 200: 32 read, the last of them run); all others errors
        assert len(turn.tool_results) <= 33 and all(is_error(m) for m in turn.tool_results[:-1])
        assert is_error(turn.tool_results[-1]) or action.startswith('<tool>[{"name": "pwd"')
    assert len(results) == sum(len(t.tool_results) for t in turns)
    assert decimal.getcontext().prec == prec and mpmath.mp.prec == mp_prec


async def test_an_injected_name_or_key_never_runs_a_second_call() -> None:
    toolbox = BfclToolbox(env=BfclEnv.fresh(get_entry(ENTRY)))
    for action in HOSTILE[8:11]:
        for tool_call in parse_action(action).calls:
            message, error = await toolbox.execute(tool_call)
            assert error == "unsafe_call" and is_error(message)
    assert VICTIM in toolbox.env.run("ls()").output
    assert toolbox.calls == [[REFUSED_CALL] * 3]  # recorded as calls made, which fail the same way in replay
    assert execute(REFUSED_CALL, toolbox.env.instances, toolbox.env.methods).error == "unsafe_call"


async def test_square_root_leaves_the_decimal_context_and_mpmath_alone() -> None:
    prec, mp_prec = decimal.getcontext().prec, mpmath.mp.prec
    results, _ = await roll([call("square_root", number=2, precision=3), call("logarithm", value=10, base=2,
                                                                                precision=50)])
    assert "1.41" in results[0].content and "1.414" not in results[0].content  # it ran at its own precision
    assert "3.32192809488736234787031942948939017586483139302" in results[1].content
    assert decimal.getcontext().prec == prec and mpmath.mp.prec == mp_prec
    # The episode ran them in a worker thread; the checker's replay (and any caller) runs them on
    # its own thread, whose decimal context must come back unchanged as well.
    env = BfclEnv.fresh(get_entry(ENTRY))
    assert "1.41'" in env.run("square_root(number=2, precision=3)").output
    env.run("logarithm(value=10, base=2, precision=300)")
    assert decimal.getcontext().prec == prec and mpmath.mp.prec == mp_prec
    assert str(decimal.Decimal(2).sqrt()) == "1.414213562373095048801688724"


def test_deep_expressions_in_a_call_string_are_errors() -> None:
    env = BfclEnv.fresh(get_entry(ENTRY))
    for op in ("-", "not ", "~"):
        for depth in (300, 800, 2000, 20_000):  # 800 broke ast.unparse; 20000 breaks ast.parse
            result = execute(f"add(a={op * depth}1, b=1)", env.instances, env.methods)
            assert result.output.startswith("Error during execution: ") and result.error == "unsafe_call"
    for text in ("add(a=" + "[" * 150 + "]" * 150 + ", b=1)", "add(a=" + "9" * 4400 + ", b=1)",
                 "add(a=1e999, b=1)", "add(a=" + "1" * 200 + ", b=1)", "power(base=7, exponent=" + "9" * 90 + ")"):
        result = execute(text, env.instances, env.methods)
        assert result.output.startswith("Error during execution: "), (text[:40], result)


def generated(rng: random.Random, n: int) -> list[str]:
    """Random text, random bytes as text, and valid actions with random characters changed."""
    base = call("mean", numbers=[1, 2.5, 3]) + call("cd", folder="workspace")
    out = []
    for _ in range(n):
        kind = rng.randrange(3)
        if kind == 0:
            text = "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randrange(200)))
            out.append(f"<tool>{text}</tool>")
        elif kind == 1:
            out.append(tool(rng.randbytes(rng.randrange(300)).decode("utf-8", "replace")))
        else:
            chars = list(base)
            for _ in range(rng.randrange(1, 6)):
                chars[rng.randrange(len(chars))] = rng.choice('{}[]":,\\ 09eE-+.nNaI\'()#=')
            out.append("".join(chars))
    return out


def test_generated_text_never_raises_in_the_parser() -> None:
    for text in generated(random.Random(7), 3000):
        action = parse_action(text)
        assert len(action.calls) + len(action.parse_errors) <= 33


async def test_generated_actions_end_as_errors_or_results_in_the_episode() -> None:
    actions = generated(random.Random(11), 120)
    _, rollout = await roll(actions)
    assert rollout.episode.stop_reason is StopReason.GAVE_UP and rollout.reward is not None
    assert len(rollout.episode.turns) == len(actions) + 1
    assert all(turn.tool_results for turn in rollout.episode.turns[:-1])  # each action was answered


def hostile_player(crash_at: int) -> Any:
    """Hostile actions in turn; every ``crash_at``-th sample is one the loop cannot take (its logprobs
    do not match its tokens), which raises inside the episode: an unexpected exception in one rollout."""
    counter = count()

    def play(messages: Sequence[Message]) -> str | Sample:
        n = next(counter)
        if n % crash_at == crash_at - 1 or n == 0:  # n == 0: a first sample (the group's request) crashes too
            return Sample("<tool>{}</tool>", (1,), (1, 2), (-0.5,), "stop", PolicyVersion(0))
        return HOSTILE[n % len(HOSTILE)] if n % 5 else "<TASK_FINISHED>"

    return play


async def test_collect_keeps_going_through_hostile_actions_and_a_crashing_rollout(tmp_path: Path) -> None:
    tasks = get_domain("tool_use").load_tasks(TaskSpec("base", "train", n=3, seed=1))
    cfg = CollectConfig(run_dir=tmp_path, domain="tool_use", task_source="base", variant=Variant.EXIT, groups=4,
                        group_size=3, concurrency=2, max_tokens=200_000, max_context=BIG, max_turns=4,
                        min_buffer=2, p_buffer=1.0, progress=False, poll_s=0.05)
    async with ToolUseEvaluator() as evaluator:
        with SQLiteStore.in_run(tmp_path) as store:
            summary = await collect(cfg, ScriptedPolicy(hostile_player(crash_at=7), max_context=BIG), evaluator,
                                    store, tasks, embedder=HashEmbedder())
            groups = store.fetch_groups()
    assert summary.groups == len(groups) == 4 and all(len(g.rollouts) == 3 for g in groups)
    crashed = [r for g in groups for r in g.rollouts if r.failure.startswith("crashed: ValueError")]
    assert crashed and summary.crashed_rollouts == len(crashed) and all(r.reward is None for r in crashed)
    assert all(r.reward is not None for g in groups for r in g.rollouts if not r.failure)
    rows = read_metrics(tmp_path, "collect")
    assert rows[-1]["rollouts_crashed_total"] == len(crashed)


class CrashingEvaluator(ExactMatchEvaluator):
    """An evaluator with a bug that one response reaches (not an ``EvaluatorError``)."""

    async def score(self, task: Task, response: str) -> Any:
        if response == "crash":
            raise RecursionError("maximum recursion depth exceeded")
        return await super().score(task, response)


async def test_an_unexpected_evaluator_exception_fails_one_rollout_not_the_run(tmp_path: Path) -> None:
    tasks = [Task(f"t{i}", "math", f"What is {i} + {i}?", answer=str(2 * i)) for i in range(3)]
    counter = count()
    policy = ScriptedPolicy(lambda messages: "crash" if next(counter) % 4 == 0 else "2", max_context=4096)
    cfg = CollectConfig(run_dir=tmp_path, variant=Variant.GRPO, groups=3, group_size=4, concurrency=1,
                        max_tokens=16, progress=False)
    with SQLiteStore.in_run(tmp_path) as store:
        summary = await collect(cfg, policy, CrashingEvaluator(), store, tasks)
        rollouts = [r for g in store.fetch_groups() for r in g.rollouts]
    assert summary.groups == 3 and len(rollouts) == 12
    failed = [r for r in rollouts if r.text == "crash"]
    assert len(failed) == summary.failed_rollouts == 3
    assert all(r.reward is None and "evaluator crashed: RecursionError" in r.failure for r in failed)
