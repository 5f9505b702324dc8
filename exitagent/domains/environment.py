"""The public way to bring your own tasks, tools and reward to exitagent (docs/environments.md).

An ``Environment`` is a ``Domain`` (``domains.base``) built from a few plain pieces::

    env = Environment(tasks=[Task("t1", "demo", "What is 2+3?", answer="5")],
                      reward=lambda task, response: float(task.answer in response))

and selected with ``--domain my_package.module:env`` (or the ``exitagent.domains`` entry point),
so collect, evaluate, variants and the main job run it as they run math.

- ``tasks``: a list of ``Task``, or a function of the command line's ``TaskSpec`` returning one.
- ``reward(task, response)`` or ``reward(task, response, state)``, sync or async: a number, or a
  ``Score`` with named components. ``response`` is the episode's final assistant text. A reward
  function that raises or returns something else fails its rollout: left out of training and of
  the buffer's scores, never scored 0.
- ``tools``: typed Python functions (``function_tools``); a first parameter named ``state`` gets
  the episode's state. The model calls them in the paper's ``<tool>{json}</tool>`` format (the
  schemas go in the system prompt), or natively when ``native_tools`` (vLLM's tool parser).
- ``python``: a sandboxed Python tool (``--sandbox``: bubblewrap, process, e2b, fake).
- ``state``: a factory ``state(task)``; each rollout gets its own instance. A group that starts
  mid-episode (a buffer entry at turn t) builds one, replays the prefix's calls on it, and gives
  each rollout a deep copy: tools should be deterministic given the state.

Without tools or ``python`` an episode is one answer (like math). With them it is multi-turn (like
tool use): it ends when the model answers without a call, writes ``<TASK_FINISHED>``, or a limit
is hit, and every per-turn prefix becomes a buffer entry. Evaluation (``evaluate_task``) is the
paper's: a first attempt and K improve steps; a multi-turn improve step is a fresh episode shown
the previous final answer.
"""

from __future__ import annotations

import copy
import inspect
import math
import random
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog

from evaluators.base import Evaluator
from exitagent.curriculum import Start
from exitagent.domains.base import DomainSettings, TaskSpec
from exitagent.errors import ConfigError, EvaluatorError, ExitAgentError, score_or_failure
from exitagent.function_tools import FunctionTool, function_tool
from exitagent.iterates import iterate_messages, sample_step
from exitagent.loop import EpisodeLimits, run_episode_or_crash
from exitagent.policy import Policy, SamplingParams
from exitagent.policy import room as context_room
from exitagent.rollouts import CUT_OFF, roll_out, score_rollout
from exitagent.tools import PythonTool, Tool, Toolbox
from exitagent.trajectories import Step, TaskResult, run_task
from exitagent.types import Episode, Group, Message, Rollout, Sample, Score, StepKind, Task
from sandboxes.base import Limits, Sandbox
from sandboxes.factory import open_sandbox

log = structlog.get_logger(__name__)

MIN_ANSWER_TOKENS = 16  # a start whose prompt leaves less room than this is re-attempted as a base task
Tasks = Sequence[Task] | Callable[[TaskSpec], Sequence[Task]]


class RewardJudge:
    """The ``Evaluator`` of one rollout: the user's reward function on its response (and state)."""

    def __init__(self, reward: Callable[..., Any], state: Any = None, *, wants_state: bool = False) -> None:
        self.reward, self.state, self.wants_state = reward, state, wants_state
        self.sandbox: Sandbox | None = None  # set by ``Environment.open_evaluator`` when ``python``

    async def score(self, task: Task, response: str) -> Score:
        args = (task, response, self.state) if self.wants_state else (task, response)
        try:
            if inspect.iscoroutinefunction(self.reward):
                value = await self.reward(*args)
            else:
                value = await anyio.to_thread.run_sync(self.reward, *args)
        except ExitAgentError:
            raise
        except Exception as error:  # the user's reward failed on this response: the rollout is left out
            raise EvaluatorError(f"the reward function raised {type(error).__name__}: {str(error)[:200]}") from None
        return _as_score(value)


def _reward_arity(name: str, reward: Any) -> int:
    """2 for ``reward(task, response)``, 3 for ``reward(task, response, state)``; ``ConfigError`` otherwise."""
    try:
        params = list(inspect.signature(reward).parameters.values())
    except (TypeError, ValueError):  # not callable, or a signature Python cannot read
        raise ConfigError(f"Environment {name}: reward must be a function (task, response[, state]), "
                          f"not {reward!r:.80}") from None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) not in (2, 3):
        raise ConfigError(f"Environment {name}: reward takes (task, response) or (task, response, state), "
                          f"not {len(positional)} parameters")
    return len(positional)


def _as_score(value: Any) -> Score:
    if isinstance(value, Score):
        total = value.total
    elif isinstance(value, (int, float)):  # bool included: True is 1.0
        total, value = float(value), Score(float(value), {"reward": float(value)})
    else:
        raise EvaluatorError(f"the reward function returned a {type(value).__name__}, not a number or Score")
    if not math.isfinite(total):
        raise EvaluatorError(f"the reward function returned {total}")
    return value


@dataclass
class Environment:
    """Tasks, a reward and optional tools: a ``Domain`` in a few lines (see the module docstring)."""

    tasks: Tasks
    reward: Callable[..., Any]
    tools: Sequence[Callable[..., Any]] = ()
    state: Callable[[Task], Any] | None = None
    python: bool = False  # a sandboxed Python tool (the Sandbox seam, --sandbox)
    system_prompt: str = ""
    max_turns: int | None = None  # per episode; default 1 without tools, 10 with (--max-turns overrides)
    native_tools: bool = False  # schemas to the server as OpenAI tools (it must parse tool calls)
    require_action: bool = False  # a message with no call and no <TASK_FINISHED> is told so; the episode goes on
    tool_timeout_s: float = 10.0
    name: str = "custom"
    curriculum: str = ""  # the paper's buffer preset to use (math, tool_use, mle); default by turns
    _tools: tuple[FunctionTool, ...] = field(init=False, repr=False)
    _wants_state: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._wants_state = _reward_arity(self.name, self.reward) == 3
        if not callable(self.tasks) and not all(isinstance(t, Task) for t in self.tasks):
            raise ConfigError(f"Environment {self.name}: tasks must be Task objects or a function returning them")
        self._tools = tuple(function_tool(fn, timeout_s=self.tool_timeout_s) for fn in self.tools)
        names = [t.name for t in self._tools] + (["python"] if self.python else [])
        if len(set(names)) < len(names):
            raise ConfigError(f"Environment {self.name}: two tools share a name: {sorted(names)}")
        self.curriculum = self.curriculum or ("tool_use" if self.multi_turn else "math")

    @property
    def multi_turn(self) -> bool:
        return bool(self._tools or self.python)

    # --- the Domain protocol ---------------------------------------------------------------------

    def load_tasks(self, spec: TaskSpec) -> list[Task]:
        try:
            tasks = list(self.tasks(spec) if callable(self.tasks) else self.tasks)
        except ExitAgentError:
            raise
        except Exception as error:
            raise ConfigError(f"Environment {self.name}: its tasks function raised {type(error).__name__}: "
                              f"{str(error)[:200]}") from None
        if not tasks or not all(isinstance(t, Task) for t in tasks):
            raise ConfigError(f"Environment {self.name}: its tasks must be a non-empty list of Task")
        if not callable(self.tasks) and spec.n is not None and spec.n < len(tasks):
            tasks = random.Random(spec.seed).sample(tasks, spec.n)
        return tasks

    def open_evaluator(self, settings: DomainSettings) -> AbstractAsyncContextManager[Evaluator]:
        return self._judge(settings)

    @asynccontextmanager
    async def _judge(self, settings: DomainSettings) -> AsyncIterator[Evaluator]:
        judge = self._judge_of(None)
        if not self.python:
            yield judge
            return
        limits = Limits(wall_s=settings.eval_timeout_s, memory_bytes=settings.memory_mb << 20)
        async with open_sandbox(settings.sandbox, limits=limits) as sandbox:
            judge.sandbox = sandbox
            yield judge

    async def roll_out(self, start: Start, policy: Policy, evaluator: Evaluator, *, group_size: int,
                       params: SamplingParams, settings: DomainSettings) -> Group:
        system = self._system(evaluator)
        if start.entry is not None and context_room(policy, (*system, *start.messages())) < MIN_ANSWER_TOKENS:
            log.warning("start_shortened", entry_id=start.entry.id, task_id=start.task.id)
            start = start.base()
        if context_room(policy, (*system, *start.messages())) < MIN_ANSWER_TOKENS:
            raise ConfigError(f"task {start.task.id} does not fit in a {policy.max_context}-token context")
        base = self._new_state(start.task)
        if self.multi_turn and start.prefix:
            await self._toolbox(base, evaluator).replay(start.prefix)  # the state at the end of the prefix
        states = [_copy(self.name, base) for _ in range(group_size)]

        async def score(index: int, episode: Episode) -> Rollout:
            return await score_rollout(self._judge_of(states[index]), start.task, episode,
                                       episode.final_text, index=index)

        if not self.multi_turn:
            rollouts = await roll_out(start.task, (*system, *start.messages()), policy, evaluator,
                                    group_size=group_size, params=params, score=score)
            return start.group(rollouts)
        ordinary = (*system, Message("user", start.task.prompt), *start.prefix)
        turns = max(self._turns(settings) - start.start_turn, 1)
        rollouts = await roll_out(start.task, ordinary, policy, evaluator, group_size=group_size, params=params,
                                toolboxes=[self._toolbox(s, evaluator) for s in states],
                                limits=EpisodeLimits(max_turns=turns, max_total_tokens=params.max_tokens * turns),
                                prompt=(*system, *start.messages()), score=score)
        head = len(system) + 1  # every per-turn prefix after the request becomes a buffer entry
        return start.group(rollouts, [r.episode.messages[head:] for r in rollouts])

    async def evaluate_task(self, policy: Policy, evaluator: Evaluator, task: Task, *, steps: int, samples: int,
                            params: SamplingParams, settings: DomainSettings,
                            tick: Callable[[int], object]) -> TaskResult:
        system = self._system(evaluator)
        if not self.multi_turn:
            async def attempt(policy: Policy, task: Task, current: str | None, n: int,
                              params: SamplingParams) -> list[Sample] | None:
                return await sample_step(policy, (*system, *iterate_messages(StepKind.IMPROVE, task.prompt, current)),
                                         params, n=n)

            judge = _FreshState(self)
            return await run_task(policy, judge, task, steps=steps, samples=samples, params=params, tick=tick,
                                  attempt=attempt)
        trajectories: list[tuple[Step, ...]] = [()] * samples

        async def one(index: int) -> None:
            out: list[Step] = []
            for _ in range(steps + 1):
                current = out[-1].text if out else None
                out.append(await self._episode_step(policy, evaluator, task, current, params, settings))
                tick(1)
            trajectories[index] = tuple(out)

        async with anyio.create_task_group() as group:
            for index in range(samples):
                group.start_soon(one, index)
        return TaskResult(task, tuple(trajectories))

    # --- pieces ----------------------------------------------------------------------------------

    async def _episode_step(self, policy: Policy, evaluator: Evaluator, task: Task, current: str | None,
                            params: SamplingParams, settings: DomainSettings) -> Step:
        """One multi-turn iterate: an episode on a fresh state (shown the latest answer after the first)."""
        state, turns = self._new_state(task), self._turns(settings)
        messages = (*self._system(evaluator), *iterate_messages(StepKind.IMPROVE, task.prompt, current))
        episode = await run_episode_or_crash(task, policy, self._toolbox(state, evaluator), messages,
                                             limits=EpisodeLimits(max_turns=turns,
                                                                  max_total_tokens=params.max_tokens * turns),
                                             params=params)
        version = str(episode.turns[0].sample.version) if episode.turns else ""
        if episode.failure:
            return Step(episode.final_text, None, version, failure=episode.failure)
        score, failure = await score_or_failure(self._judge_of(state).score(task, episode.final_text),
                                                "iterate_scoring_failed", task_id=task.id)
        return Step(episode.final_text, None if score is None else score.total, version,
                    episode.stop_reason in CUT_OFF, failure=failure)

    def _judge_of(self, state: Any) -> RewardJudge:
        return RewardJudge(self.reward, state, wants_state=self._wants_state)

    def _new_state(self, task: Task) -> Any:
        """A fresh state for ``task``; the user's factory failing is a ``ConfigError`` (their code, not the model's)."""
        try:
            return self.state(task) if self.state is not None else None
        except Exception as error:
            raise ConfigError(f"Environment {self.name}: the state factory raised {type(error).__name__}: "
                              f"{str(error)[:200]} (task {task.id})") from None

    def _turns(self, settings: DomainSettings) -> int:
        return settings.max_turns or self.max_turns or (10 if self.multi_turn else 1)

    def _toolbox(self, state: Any, evaluator: Evaluator) -> Toolbox:
        tools: list[Tool] = [t.bound(state) for t in self._tools]
        sandbox = getattr(evaluator, "sandbox", None)
        if self.python:
            if sandbox is None:
                raise ConfigError(f"Environment {self.name}: python=True needs the evaluator it opens (a sandbox)")
            tools.append(PythonTool(sandbox))
        return Toolbox.of(*tools, native=self.native_tools, require_action=self.require_action)

    def _system(self, evaluator: Evaluator) -> tuple[Message, ...]:
        parts = [self.system_prompt] if self.system_prompt else []
        if self.multi_turn and not self.native_tools:
            parts.append(self._toolbox(None, evaluator).describe())
        return (Message("system", "\n\n".join(parts)),) if parts else ()


def _copy(name: str, state: Any) -> Any:
    try:
        return copy.deepcopy(state)
    except Exception as error:  # e.g. a lock or an open connection inside the state
        raise ConfigError(f"Environment {name}: each rollout gets a deep copy of the state, and this one "
                          f"cannot be copied: {type(error).__name__}: {str(error)[:200]}") from None


class _FreshState:
    """Single-turn evaluation: each response scored on a fresh state of its task."""

    def __init__(self, env: Environment) -> None:
        self.env = env

    async def score(self, task: Task, response: str) -> Score:
        return await self.env._judge_of(self.env._new_state(task)).score(task, response)
