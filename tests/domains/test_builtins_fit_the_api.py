"""The built-in tool-use and MLE domains expressed through the public ``Environment`` API score their
groups as the domains themselves do (math's twin is in test_environment.py).

Each adapter is what a user would write: BFCL's functions as typed Python tools acting on the
episode's state, with BFCL's checker as the reward; an MLE competition's prompt as the task and the
sandboxed grader as the reward. The same scripted policy plays both sides; the scores, the tool
results the model saw and the token sequences must agree.

What ``Environment`` does not express, and so why the built-ins stay ``Domain`` implementations
(the protocol ``--domain`` also takes from users): tool use's evaluation (every request of an
entry in turn, K revisions of every action) and its snapshots of environments at each turn; MLE's
improve-step reward (the share of the gap to the best score a step closed), and its buffer
children: the program with its crash trace, where a single-turn environment keeps the response.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from evaluators.tool_use import CallRecord, ToolUseEvaluator
from evaluators.worlds.bfcl.calls import render_call
from evaluators.worlds.bfcl.env import BfclEnv, Entry, entry_docs, get_entry
from evaluators.worlds.mle import Competition
from evaluators.worlds.mle.references import strong_program
from exitagent import Environment, Score, Task
from exitagent.curriculum import Start
from exitagent.domains import DomainSettings
from exitagent.domains.mle import MLEDomain, task_for
from exitagent.domains.tool_use import ToolUseDomain, task_of
from exitagent.policy import SamplingParams, ScriptedPolicy
from exitagent.types import Group, StepKind
from tests.domains.test_mle import CRASH, _fenced
from tests.domains.test_mle import SETTINGS as MLE_SETTINGS
from tests.domains.test_tool_use import BIG, ground_truth_player
from tests.sandboxing import needs_bwrap

pytestmark = pytest.mark.anyio
PARAMS = SamplingParams(max_tokens=400)
JSON_TYPES: dict[str, type] = {"string": str, "integer": int, "float": float, "number": float, "boolean": bool,
                               "array": list, "dict": dict}


def assert_same_groups(ours: Group, theirs: Group) -> None:
    def totals(group: Group) -> list[float | None]:
        return [r.score.total if r.score else None for r in group.rollouts]

    assert totals(ours) == totals(theirs) and [r.reward for r in ours.rollouts] == [r.reward for r in theirs.rollouts]
    assert [r.episode.sequences for r in ours.rollouts] == [r.episode.sequences for r in theirs.rollouts]


# --- tool use: BFCL's functions as typed tools, its checker as the reward -------------------------


@dataclass
class Scenario:
    """One rollout's BFCL API instances and the calls it ran (what the checker replays)."""

    env: BfclEnv
    calls: list[str] = field(default_factory=list)


def bfcl_tool(doc: dict[str, Any]) -> Callable[..., str]:
    """A BFCL function doc as a typed Python function on the episode's ``Scenario``."""
    schema = doc["parameters"]
    required = set(schema.get("required", ()))
    hints = {name: JSON_TYPES[p["type"]] if name in required else JSON_TYPES[p["type"]] | None
             for name, p in schema["properties"].items()}

    def tool(state: Scenario, **arguments: Any) -> str:
        text = render_call(doc["name"], {k: v for k, v in arguments.items() if v is not None})
        state.calls.append(text)
        return state.env.run(text).output

    params = [inspect.Parameter("state", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=hint,
                                 default=inspect.Parameter.empty if name in required else None)
               for name, hint in hints.items()]
    tool.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    tool.__annotations__ = dict(hints)
    tool.__name__ = doc["name"]
    described = "".join(f"\n    {name}: {p.get('description', '')}" for name, p in schema["properties"].items())
    tool.__doc__ = f"{doc['description']}\n\nArgs:{described}"
    return tool


def bfcl_environment(entry: Entry, checker: ToolUseEvaluator) -> Environment:
    async def reward(task: Task, response: str, state: Scenario) -> Score:  # the first request, as training
        return await checker.score(task, CallRecord(entry.id, (tuple(state.calls),)).to_json())

    return Environment(tasks=[task_of(entry)], reward=reward, tools=[bfcl_tool(d) for d in entry_docs(entry)],
                       state=lambda task: Scenario(BfclEnv.fresh(get_entry(task.id))), require_action=True,
                       max_turns=10, curriculum="tool_use", name="bfcl")


@pytest.mark.parametrize("wrong_at", [None, (0, 1)])
async def test_tool_use_expressed_through_the_public_api_scores_as_the_tool_use_domain(
        wrong_at: tuple[int, int] | None) -> None:
    entry = get_entry("multi_turn_base_0")  # the first request takes cd, mkdir, mv
    settings = DomainSettings(max_context=BIG)
    start = Start(task_of(entry), StepKind.BASE)
    async with ToolUseEvaluator() as checker:
        env = bfcl_environment(entry, checker)
        async with env.open_evaluator(settings) as judge:
            ours = await env.roll_out(start, ScriptedPolicy(ground_truth_player(entry, wrong_at), max_context=BIG),
                                      judge, group_size=2, params=PARAMS, settings=settings)
        theirs = await ToolUseDomain().roll_out(start, ScriptedPolicy(ground_truth_player(entry, wrong_at),
                                                                      max_context=BIG),
                                                checker, group_size=2, params=PARAMS, settings=settings)
    assert [r.reward for r in ours.rollouts] == [0.0 if wrong_at else 1.0] * 2
    assert [r.reward for r in ours.rollouts] == [r.reward for r in theirs.rollouts]
    assert ours.histories is not None and theirs.histories is not None

    def seen(histories: Sequence[Sequence[Any]]) -> list[list[tuple[str, str]]]:  # actions, and what tools said
        return [[(m.role, m.content) for m in h if m.role in ("assistant", "tool")] for h in histories]

    assert seen(ours.histories) == seen(theirs.histories)  # so every per-turn prefix is the same buffer entry


# --- MLE: the competition's prompt as the task, the sandboxed grader as the reward ----------------


@needs_bwrap
async def test_mle_expressed_through_the_public_api_scores_as_the_mle_domain(iris: Competition) -> None:
    domain = MLEDomain()
    probe = ScriptedPolicy([], max_context=200_000)
    messages = domain.start_messages(Start(task_for(iris), StepKind.BASE), MLE_SETTINGS, probe)
    assert messages is not None and len(messages) == 1  # the whole prompt is one user message
    task = replace(task_for(iris), prompt=messages[0].content)
    responses = [_fenced(strong_program(iris.id)), _fenced(CRASH), "A random forest would do well here."]

    def policy() -> ScriptedPolicy:
        return ScriptedPolicy(list(responses), max_context=200_000)

    async with domain.open_evaluator(MLE_SETTINGS) as grader:
        env = Environment(tasks=[task], reward=grader.score, curriculum="mle", name="mle")
        async with env.open_evaluator(MLE_SETTINGS) as judge:
            ours = await env.roll_out(Start(task, StepKind.BASE), policy(), judge, group_size=3,
                                      params=SamplingParams(max_tokens=20_000), settings=MLE_SETTINGS)
        theirs = await domain.roll_out(Start(task_for(iris), StepKind.BASE), policy(), grader, group_size=3,
                                       params=SamplingParams(max_tokens=20_000), settings=MLE_SETTINGS)
    assert_same_groups(ours, theirs)
    components = [{k: v for k, v in r.score.components.items() if k != "runtime_s"}
                  for g in (ours, theirs) for r in g.rollouts if r.score]
    assert components[:3] == components[3:]  # errored, format_error, valid_submission alike
    assert [r.reward for r in ours.rollouts][:2] == [pytest.approx(1.0), 0.0]
