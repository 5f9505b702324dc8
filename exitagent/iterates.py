"""Iterates: ask a served policy for an answer, then ask it to improve (or diverge from) it K times.

The loop behind ``SelfImprovingAgent.improve`` (``exitagent.agent``, the app-facing object; its
docstring is the user's guide) and behind evaluation's trajectories (``trajectories``). Each step
sees only the request and the latest iterate, through the very prompts training uses
(``exitagent.prompts``). With ``AgentTools`` every iterate is a multi-turn episode with the app's
tools. With an ``EpisodeRecorder`` each step is sampled as the recorder asks (one answer, or G for
a trainable group) and kept as a group that starts from the step's prompt: step 0 a BASE group,
step k an IMPROVE (or DIVERGE) group of depth k, as in ExIt. An evaluator's score is the served
answer's reward; without one the app gives it (``feedback(iterate.episode_id, reward)``).
"""

from __future__ import annotations

import inspect
import math
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal, Protocol

import anyio
import structlog

from exitagent.errors import ConfigError, score_or_failure
from exitagent.function_tools import FunctionTool
from exitagent.loop import EpisodeLimits, run_group
from exitagent.policy import TRAINING_TEMPERATURE, Policy, SamplingParams, room
from exitagent.prompts import step_messages
from exitagent.tools import PythonTool, Tool, Toolbox
from exitagent.types import APP_TASK_PREFIX, CUT_OFF, Episode, Message, Sample, Score, StepKind, Task
from sandboxes.base import Sandbox

log = structlog.get_logger(__name__)

MIN_ANSWER_TOKENS = 16  # a step that leaves less room than this for the answer is not worth sending
AGENT_PARAMS = SamplingParams(max_tokens=512, temperature=TRAINING_TEMPERATURE)  # the policy as it was trained

Mode = Literal["improve", "diverge"]
MODES: dict[str, StepKind] = {"improve": StepKind.IMPROVE, "diverge": StepKind.DIVERGE}
ScoreValue = float | int | bool | Score
TextEvaluator = Callable[[str], ScoreValue | Awaitable[ScoreValue]]


async def sample_step(policy: Policy, messages: Sequence[Message], params: SamplingParams,
                      n: int = 1) -> list[Sample] | None:
    """``n`` answers to ``messages``, ``max_tokens`` capped to the context left; None when it does not fit.

    The estimate over-counts (``Policy.estimate_tokens``), so a prompt sent here never overflows
    the server's context: an overflow would be a 400 from the server, which is not a model mistake.
    """
    left = room(policy, messages)
    budget = min(params.max_tokens, left)
    if budget < MIN_ANSWER_TOKENS:
        return None
    return await policy.sample(messages, n=n, params=replace(params, max_tokens=budget))


def iterate_messages(kind: StepKind, request: str, current: str | None) -> tuple[Message, ...]:
    """Step 0 answers the plain request; later steps see the request and the latest iterate only."""
    if current is None:
        return step_messages(StepKind.BASE, request)
    return step_messages(kind, request, (), current)


class TextScorer:
    """Adapts a plain function of the response text (sync or async, number or ``Score``) to one await."""

    def __init__(self, function: TextEvaluator) -> None:
        self.function = function

    async def __call__(self, text: str) -> float:
        if inspect.iscoroutinefunction(self.function):
            value = await self.function(text)
        else:
            value = await anyio.to_thread.run_sync(self.function, text)
            if inspect.isawaitable(value):  # e.g. ``lambda text: evaluator.score(task, text)``
                value = await value
        total = value.total if isinstance(value, Score) else value
        if isinstance(total, bool | int | float) and math.isfinite(total):
            return float(total)
        raise TypeError(f"an evaluator must return a finite number or a Score, not {value!r}")


@dataclass(frozen=True)
class Iterate:
    """One response: ``step`` 0 is the first attempt, step k the k-th revision."""

    step: int
    text: str
    score: float | None = None  # None: no evaluator, or it could not judge (``failure`` says why)
    failure: str = ""
    finish_reason: str = "stop"  # "length": cut off at max_tokens
    messages: tuple[Message, ...] = ()  # with tools: the episode after its prompt (calls, results, answer)
    episode_id: str = ""  # recorded: what ``feedback`` takes (set when a recorder kept this step)
    group_ids: tuple[str, ...] = ()  # recorded: the step's other sampled answers (``Reply.group_ids``)


@dataclass(frozen=True)
class Improvement:
    """Every iterate of one ``improve`` call, in order."""

    request: str
    mode: str
    iterates: tuple[Iterate, ...]
    scored: bool  # an evaluator was given
    stopped_early: bool = False  # the next prompt would not have fit the context

    @property
    def final(self) -> Iterate:
        return self.iterates[-1]

    @property
    def best(self) -> Iterate | None:
        """The highest score, the earliest on ties; None when nothing was scored."""
        scored = [it for it in self.iterates if it.score is not None]
        return max(scored, key=lambda it: (it.score, -it.step)) if scored else None


class EpisodeRecorder(Protocol):
    """Where the app's episodes go to become training data (``exitagent.recorder.Recorder``)."""

    def group_size(self) -> int:
        """How many answers to sample for the next request (1, or G for a trainable group)."""
        ...

    async def open(self, request: str, head: int, episodes: Sequence[Episode], *, kind: StepKind = StepKind.BASE,
                   depth: int = 0) -> list[str]:
        """Keep ``episodes`` (the first is served; ``head`` messages precede the answer: the step's
        prompt, a group of step ``kind`` and ``depth``) until their rewards arrive; their ids, in order."""
        ...

    async def feedback(self, episode_id: str, reward: float | Score) -> None: ...


async def improve(policy: Policy, request: str, *, steps: int = 4, mode: Mode = "improve",
                  params: SamplingParams = AGENT_PARAMS, evaluator: TextEvaluator | None = None,
                  tools: AgentTools | None = None, recorder: EpisodeRecorder | None = None) -> Improvement:
    """y^0 for ``request``, then ``steps`` improve (or diverge) steps, each iterate scored when asked.
    With ``tools`` each iterate is a multi-turn episode (``AgentTools.episodes``); with ``recorder``
    each step is recorded (module docstring)."""
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {sorted(MODES)}, not {mode!r}")
    if steps < 0:
        raise ConfigError(f"steps must be >= 0, not {steps}")
    scorer = None if evaluator is None else TextScorer(evaluator)
    iterates: list[Iterate] = []
    for step in range(steps + 1):
        current = iterates[-1].text if iterates else None
        messages = iterate_messages(MODES[mode], request, current)
        if recorder is not None:
            kind = StepKind.BASE if current is None else MODES[mode]
            iterate = await _recorded_iterate(policy, tools, recorder, request, messages, params, step, kind, scorer)
        else:
            iterate = await (_tool_iterate(policy, tools, request, messages, params, step) if tools
                             else _text_iterate(policy, messages, params, step))
            if iterate is not None and scorer and not iterate.failure:
                iterate = await _scored(iterate, scorer)
        if iterate is None:
            log.info("improve_stopped_early", step=step, reason="context_full")
            break
        iterates.append(iterate)
    if not iterates:
        raise ConfigError(f"the request alone leaves under {MIN_ANSWER_TOKENS} tokens of the model's context")
    result = Improvement(request, mode, tuple(iterates), scorer is not None, len(iterates) < steps + 1)
    log.info("improve_finished", mode=mode, steps=len(iterates) - 1, stopped_early=result.stopped_early,
             scores=[it.score for it in iterates] if scorer else None)
    return result


async def _text_iterate(policy: Policy, messages: Sequence[Message], params: SamplingParams,
                        step: int) -> Iterate | None:
    samples = await sample_step(policy, messages, params)
    return None if samples is None else Iterate(step, samples[0].text, finish_reason=samples[0].finish_reason)


async def _tool_iterate(policy: Policy, tools: AgentTools, request: str, messages: Sequence[Message],
                        params: SamplingParams, step: int) -> Iterate | None:
    prompt = (*tools.system(), *messages)
    if room(policy, prompt) < MIN_ANSWER_TOKENS:
        return None
    (episode,) = await tools.episodes(policy, request, prompt, params, n=1)
    return _iterate_of(episode, len(prompt), step)


def _iterate_of(episode: Episode, head: int, step: int) -> Iterate:
    if episode.failure:  # a bug that model text reached (loop.run_episode_or_crash): said, not scored
        return Iterate(step, episode.final_text, failure=episode.failure, finish_reason="crashed")
    return Iterate(step, episode.final_text, finish_reason="length" if episode.stop_reason in CUT_OFF else "stop",
                   messages=episode.messages[head:])


async def _recorded_iterate(policy: Policy, tools: AgentTools | None, recorder: EpisodeRecorder, request: str,
                            messages: Sequence[Message], params: SamplingParams, step: int, kind: StepKind,
                            scorer: TextScorer | None) -> Iterate | None:
    """One step as a recorded group: the recorder's number of episodes from the step's prompt in one
    request, the first served (and scored: its score is its reward; else the app's ``feedback``)."""
    prompt = (*(tools.system() if tools else ()), *messages)
    if room(policy, prompt) < MIN_ANSWER_TOKENS:
        return None
    n = recorder.group_size()
    episodes = await (tools or AgentTools((), max_turns=1)).episodes(policy, request, prompt, params, n=n)
    if not episodes or not episodes[0].turns:
        return None  # the server had no room left for an answer
    iterate = _iterate_of(episodes[0], len(prompt), step)
    if scorer and not iterate.failure:
        iterate = await _scored(iterate, scorer)
    ids = await recorder.open(request, len(prompt), episodes, kind=kind, depth=step)
    if iterate.score is not None:
        await recorder.feedback(ids[0], iterate.score)
    log.info("improve_step_recorded", step=step, kind=kind.value, episode_id=ids[0], sampled=len(episodes))
    return replace(iterate, episode_id=ids[0], group_ids=tuple(ids[1:]))


@dataclass
class AgentTools:
    """The agent's tools: typed functions (``function_tools``) and, when asked, a sandboxed Python tool.

    One toolbox per episode (tools may keep state in a closure; the agent gives none of its own).
    """

    functions: tuple[FunctionTool, ...]
    sandbox: Sandbox | None = None
    system_prompt: str = ""
    max_turns: int = 6
    native: bool = False

    def toolbox(self) -> Toolbox:
        tools: list[Tool] = list(self.functions)
        if self.sandbox is not None:
            tools.append(PythonTool(self.sandbox))
        return Toolbox.of(*tools, native=self.native)

    def system(self) -> tuple[Message, ...]:
        parts = [self.system_prompt] if self.system_prompt else []
        if not self.native:
            parts.append(self.toolbox().describe())
        return (Message("system", "\n\n".join(parts)),) if parts else ()

    async def episodes(self, policy: Policy, request: str, prompt: Sequence[Message], params: SamplingParams,
                       *, n: int) -> list[Episode]:
        """``n`` episodes from ``prompt``: one request with ``n`` samples, each episode going on alone."""
        task = Task(request_id(request), "app", request)
        limits = EpisodeLimits(max_turns=self.max_turns, max_total_tokens=params.max_tokens * self.max_turns)
        return await run_group(task, policy, [self.toolbox() for _ in range(n)], prompt, n, limits=limits,
                               params=params)


def request_id(request: str) -> str:
    """A request's task id: the same text is the same task in the store (its buffer entries share it)."""
    return APP_TASK_PREFIX + uuid.uuid5(uuid.NAMESPACE_URL, request).hex[:16]


async def _scored(iterate: Iterate, scorer: TextScorer) -> Iterate:
    score, failure = await score_or_failure(scorer(iterate.text), "iterate_scoring_failed", limit=500,
                                            step=iterate.step)
    return replace(iterate, failure=failure) if failure else replace(iterate, score=score)
