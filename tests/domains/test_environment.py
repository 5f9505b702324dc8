"""The public environment API: a user's module outside the package, selected by --domain, through
the shared group path with a scripted policy; hostile tools and rewards; math expressed through it."""

from __future__ import annotations

import json
import random
import re
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio
import pytest

from evaluators.math import MathEvaluator
from exitagent import Environment, Score, Task
from exitagent.curriculum import Curriculum, CurriculumConfig, Start
from exitagent.curriculum.store import SQLiteStore
from exitagent.domains import DomainSettings, TaskSpec, curriculum_preset, get_domain
from exitagent.domains.math import MathDomain
from exitagent.errors import ConfigError
from exitagent.policy import SamplingParams, ScriptedPolicy
from exitagent.types import Message, Sample, StepKind, StopReason, ToolCall, Variant
from tests.user_env import MODULE, write_module

PARAMS = SamplingParams(max_tokens=200)
SETTINGS = DomainSettings(max_context=8192)
pytestmark = pytest.mark.anyio


@pytest.fixture
def user_domain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = write_module(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(MODULE, None)


def call(name: str, **arguments: object) -> str:
    return "<tool>" + json.dumps({"name": name, "arguments": arguments}) + "</tool>"


def notes_player(messages: Sequence[Message]) -> str:
    """Stores the task's value, reads it back, says it: the right play for user_notes_env."""
    value, key = re.findall(r"'([^']*)'", next(m.content for m in messages if m.role == "user"))[:2]
    done = sum(m.role == "assistant" for m in messages)
    return [call("put", key=key, value=value), call("get", key=key)][done] if done < 2 else \
        f"It is {value}. <TASK_FINISHED>"


async def roll(domain: Any, start: Start, policy: ScriptedPolicy, group_size: int = 3) -> Any:
    async with domain.open_evaluator(SETTINGS) as evaluator:
        return await domain.roll_out(start, policy, evaluator, group_size=group_size, params=PARAMS,
                                     settings=SETTINGS)


async def test_a_module_outside_the_package_is_a_domain(user_domain: str) -> None:
    domain = get_domain(user_domain)
    assert isinstance(domain, Environment) and domain.multi_turn and curriculum_preset(domain) == "tool_use"
    tasks = domain.load_tasks(TaskSpec("any", "train", n=2, seed=1))
    assert len(tasks) == 2 and tasks == domain.load_tasks(TaskSpec("any", "train", n=2, seed=1))
    put = domain._tools[0]
    assert put.description == "Store a value in the notebook."
    assert put.parameters == {"type": "object", "required": ["key", "value"], "properties": {
        "key": {"type": "string", "description": "where to store it"},
        "value": {"type": "string", "description": "what to store"}}}  # `state` is not shown to the model


def record(rolled: Any, task: Task, path: Path) -> SQLiteStore:
    """The group recorded by the curriculum in a real SQLite store, as collect does."""
    store = SQLiteStore(path)
    curriculum = Curriculum(CurriculumConfig.for_domain("tool_use", Variant.EXIT, group_size=3), [task],
                            random.Random(0))
    curriculum.record(store, Start(task, StepKind.BASE), replace(rolled, id="g1"))
    return store


async def test_groups_go_through_the_group_path_and_every_turn_prefix_enters_the_buffer(
        user_domain: str, tmp_path: Path) -> None:
    domain = get_domain(user_domain)
    task = domain.load_tasks(TaskSpec("any", "train"))[0]
    rolled = await roll(domain, Start(task, StepKind.BASE), ScriptedPolicy(notes_player))
    assert [r.reward for r in rolled.rollouts] == [1.0, 1.0, 1.0]  # each rollout's own notebook
    assert all(r.episode.stop_reason is StopReason.FINISHED and r.episode.sequences for r in rolled.rollouts)
    history = rolled.histories[0]
    assert [m.role for m in history] == ["assistant", "tool", "assistant", "tool", "assistant"]
    assert json.loads(history[3].content) == {"key": "color", "value": "blue"}
    store = record(rolled, task, tmp_path / "store.sqlite")
    assert [g.id for g in store.groups()] == ["g1"]
    assert sorted(e.start_turn for e in store.entries()) == [0, 1, 2]  # one entry per turn prefix


async def test_a_start_mid_episode_replays_the_prefix_into_each_rollouts_state(user_domain: str,
                                                                              tmp_path: Path) -> None:
    domain = get_domain(user_domain)
    task = domain.load_tasks(TaskSpec("any", "train"))[1]
    rolled = await roll(domain, Start(task, StepKind.BASE), ScriptedPolicy(notes_player), group_size=1)
    (entry,) = [e for e in record(rolled, task, tmp_path / "store.sqlite").entries() if e.start_turn == 1]
    start = Start(task, StepKind.REPLAY, entry)
    assert start.prefix == rolled.histories[0][:2]  # the put call and its result
    resumed = await roll(domain, start, ScriptedPolicy(notes_player), group_size=2)
    # The continuation only reads and answers: the value is there because the prefix was replayed.
    assert [r.reward for r in resumed.rollouts] == [1.0, 1.0]
    assert all(r.episode.messages[-2].content.endswith('"Oslo"}') for r in resumed.rollouts)


async def test_multi_turn_evaluation_scores_every_iterate(user_domain: str) -> None:
    domain = get_domain(user_domain)
    task = domain.load_tasks(TaskSpec("any", "heldout"))[0]
    async with domain.open_evaluator(SETTINGS) as evaluator:
        result = await domain.evaluate_task(ScriptedPolicy(notes_player), evaluator, task, steps=2, samples=2,
                                            params=PARAMS, settings=SETTINGS, tick=lambda k: None)
    assert [[s.score for s in t] for t in result.trajectories] == [[1.0] * 3] * 2


# --- bad input: one clear error, nothing lost ------------------------------------------------------


async def test_a_bad_domain_name_is_one_clear_config_error(user_domain: str, tmp_path: Path) -> None:
    (tmp_path / "broken_env_mod.py").write_text("def broken(:\n")
    cases = {"no_such_module_xyz:ENV": "cannot import 'no_such_module_xyz'",
             "broken_env_mod:ENV": "SyntaxError", f"{MODULE}:MISSING": "has no attribute 'MISSING'",
             f"{MODULE}:NOT_A_DOMAIN": "found int 42, not an Environment or a Domain",
             "no_such_domain": "unknown domain 'no_such_domain'"}
    for name, message in cases.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            get_domain(name)


def test_an_entry_point_registers_a_domain(user_domain: str, tmp_path: Path) -> None:
    dist = tmp_path / "user_notes-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: user-notes\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[exitagent.domains]\nnotes_by_entry_point = {MODULE}:ENV\n")
    assert isinstance(get_domain("notes_by_entry_point"), Environment)


def untyped(state, key):  # type: ignore[no-untyped-def]
    return key


def test_a_tool_without_type_hints_is_refused_at_construction() -> None:
    with pytest.raises(ConfigError, match="tool untyped: parameter 'key' has no type hint"):
        Environment(tasks=[Task("t", "x", "p")], reward=lambda task, response: 0.0, tools=[untyped])


async def test_a_broken_reward_signature_state_factory_or_task_function_is_one_config_error() -> None:
    task = Task("t", "x", "p")
    with pytest.raises(ConfigError, match="reward takes \\(task, response\\) or"):
        Environment(tasks=[task], reward=lambda response: 1.0)
    with pytest.raises(ConfigError, match="reward must be a function"):
        Environment(tasks=[task], reward=3.0)  # type: ignore[arg-type]

    def tasks(spec: TaskSpec) -> list[Task]:
        raise OSError("no file")

    with pytest.raises(ConfigError, match="its tasks function raised OSError: no file"):
        Environment(tasks=tasks, reward=lambda t, r: 1.0).load_tasks(TaskSpec("", ""))
    for state, why in ((lambda t: 1 / 0, "the state factory raised ZeroDivisionError"),
                       (lambda t: {"db": threading.Lock()}, "cannot be copied")):
        env = Environment(tasks=[task], reward=lambda t, r: 1.0, state=state)
        with pytest.raises(ConfigError, match=why):
            await roll(env, Start(task, StepKind.BASE), ScriptedPolicy(["a"]), group_size=1)


def boom(x: int) -> int:
    """Always fails."""
    raise ValueError("no luck")


def junk() -> object:
    """Returns something that is not JSON."""
    return object()


def stuck() -> str:
    """Takes longer than its time limit."""
    time.sleep(1.0)
    return "late"


async def forever() -> str:
    """Never returns."""
    await anyio.sleep_forever()
    return ""


async def test_tools_that_raise_return_junk_or_hang_answer_the_model_and_the_episode_goes_on() -> None:
    env = Environment(tasks=[Task("t", "x", "p")], reward=lambda task, response: 1.0,
                      tools=[boom, junk, stuck, forever], tool_timeout_s=0.2)
    script = [call("boom", x=1), call("junk"), call("stuck"), call("forever"), "done"]
    began = time.monotonic()
    rolled = await roll(env, Start(env.load_tasks(TaskSpec("", ""))[0], StepKind.BASE), ScriptedPolicy(script),
                        group_size=1)
    (rollout,) = rolled.rollouts
    results = [m.content for m in rollout.episode.messages if m.role == "tool"]
    assert results == ["error: boom raised ValueError: no luck", results[1], "error: stuck did not return within 0.2 s",
                       "error: forever did not return within 0.2 s"]
    assert results[1].startswith("error: junk returned a object, which is not JSON")
    assert rollout.episode.stop_reason is StopReason.ANSWERED and rollout.reward == 1.0
    assert {k: v for k, v in rollout.episode.metrics.items() if k.startswith("tool_error")} == {
        "tool_error_tool_raised": 1.0, "tool_error_tool_bad_result": 1.0, "tool_error_tool_timeout": 2.0}
    assert time.monotonic() - began < 1.0


async def test_a_reward_that_raises_or_returns_junk_leaves_its_rollout_out_never_zero() -> None:
    def raising(task: Task, response: str) -> float:
        raise KeyError(response)

    for reward, why in ((raising, "the reward function raised KeyError"),
                        (lambda task, response: "yes", "returned a str, not a number or Score"),
                        (lambda task, response: float("nan"), "returned nan")):
        env = Environment(tasks=[Task("t", "x", "p")], reward=reward)
        rolled = await roll(env, Start(env.load_tasks(TaskSpec("", ""))[0], StepKind.BASE),
                            ScriptedPolicy(["a", "b"]), group_size=2)
        assert rolled.failures == 2 and all(r.reward is None and r.score is None and why in r.failure
                                                   for r in rolled.rollouts)


# --- the built-in domains fit the API -------------------------------------------------------------


async def test_math_expressed_through_the_public_api_scores_as_the_math_domain() -> None:
    domain = MathDomain()
    tasks = domain.load_tasks(TaskSpec("arithmetic", "heldout", n=3))

    def policy() -> ScriptedPolicy:  # per task: right, wrong, no answer
        left = {t.prompt: [f"\\boxed{{{t.answer}}}", "\\boxed{-1}", "no idea"] for t in tasks}
        return ScriptedPolicy(lambda messages: left[messages[-1].content].pop(0))

    async with MathEvaluator(workers=1) as math_eval:
        env = Environment(tasks=tasks, reward=math_eval.score)  # async, returns a Score with components
        assert env.load_tasks(TaskSpec("", "")) == tasks and curriculum_preset(env) == "math"
        ours, theirs = [], []
        for task in tasks:
            async with env.open_evaluator(SETTINGS) as judge:
                ours.append(await env.roll_out(Start(task, StepKind.BASE), policy(), judge, group_size=3,
                                               params=PARAMS, settings=SETTINGS))
            theirs.append(await domain.roll_out(Start(task, StepKind.BASE), policy(), math_eval, group_size=3,
                                                params=PARAMS, settings=SETTINGS))
    for a, b in zip(ours, theirs, strict=True):
        assert [r.score for r in a.rollouts] == [r.score for r in b.rollouts]
        assert [r.episode.sequences for r in a.rollouts] == [r.episode.sequences for r in b.rollouts]
    assert [r.reward for g in ours for r in g.rollouts] == [1.0, 0.0, 0.0] * 3
    assert isinstance(ours[0].rollouts[0].score, Score)


# --- native tool calls, sandboxed code ------------------------------------------------------------


@dataclass
class NativeCalls(ScriptedPolicy):
    """A server that parses tool calls itself: the script's <tool> JSON comes back as native calls."""

    offered: list[Any] = field(default_factory=list)

    async def sample(self, messages: Sequence[Message], *, n: int = 1, params: SamplingParams = PARAMS,
                     tools: Sequence[dict[str, Any]] | None = None) -> list[Sample]:
        self.offered.append(tools)
        return [self._native(s) for s in await super().sample(messages, n=n, params=params, tools=tools)]

    @staticmethod
    def _native(sample: Sample) -> Sample:
        if not sample.text.startswith("<tool>"):
            return sample
        body = json.loads(sample.text.removeprefix("<tool>").removesuffix("</tool>"))
        return replace(sample, text="", finish_reason="tool_calls",
                       tool_calls=(ToolCall(body["name"], body["arguments"], id="call_1"),))


async def test_native_tool_calls_work_and_the_schemas_go_to_the_server(user_domain: str) -> None:
    env = replace(get_domain(user_domain), native_tools=True)
    task = env.load_tasks(TaskSpec("any", "train"))[2]
    policy = NativeCalls(notes_player)
    rolled = await roll(env, Start(task, StepKind.BASE), policy, group_size=2)
    assert [r.reward for r in rolled.rollouts] == [1.0, 1.0]
    assert all(m.tool_calls for m in rolled.histories[0] if m.role == "assistant" and not m.content)
    assert {t["function"]["name"] for t in policy.offered[0]} == {"put", "get"}
    assert "<tool>" not in policy.calls[0][0].content  # the system prompt no longer lists them


async def test_python_runs_in_the_sandbox_seam() -> None:
    env = Environment(tasks=[Task("t", "x", "Print 42.", answer="42")], python=True,
                      reward=lambda task, response: float(task.answer in response))
    settings = DomainSettings(max_context=8192, sandbox="fake")
    script = [call("python", code="print(6 * 7)"), "It printed 42."]
    async with env.open_evaluator(settings) as evaluator:
        rolled = await env.roll_out(Start(env.load_tasks(TaskSpec("", ""))[0], StepKind.BASE),
                                    ScriptedPolicy(script), evaluator, group_size=1, params=PARAMS, settings=settings)
    (rollout,) = rolled.rollouts
    assert rollout.episode.messages[3].name == "python" and rollout.episode.messages[3].content.startswith("exit code")
    assert rollout.reward == 1.0


async def test_a_model_cannot_pass_the_episode_state_as_an_argument() -> None:
    from exitagent.function_tools import function_tool

    def add(state: dict, item: str) -> str:
        """Put an item in the cart."""
        state[item] = 1
        return "ok"

    own: dict[str, int] = {}
    tool = function_tool(add).bound(own)
    result = await tool.run({"state": {"forged": 1}, "item": "apple"})
    assert result.error and "has no argument 'state'" in result.content and own == {}
    assert (await tool.run({"item": "apple"})).content == "ok" and own == {"apple": 1}
