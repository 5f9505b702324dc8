"""The embeddable self-improving agent: ask a served policy for an answer, then ask it to improve it K times.

    from exitagent import SelfImprovingAgent

    async with SelfImprovingAgent("http://127.0.0.1:8000/v1") as agent:
        result = await agent.improve("What is 17 * 23? Put your final answer in \\\\boxed{}.", steps=4,
                                     evaluator=lambda text: float("391" in text))
    print(result.best.text if result.best else result.final.text)

    result = SelfImprovingAgent(url).improve_sync(request, steps=4)  # from code with no event loop

Each step sees only the request and the latest iterate, through the very prompts training uses
(``exitagent.prompts``): ``mode="improve"`` asks for a better response, ``mode="diverge"`` for one
whose approach significantly differs. Any OpenAI-compatible server works (token ids are not needed).

Scoring. ``evaluator`` is optional: a function of the response text that returns a number (or a
``Score``), sync or async. A sync one runs in a worker thread, so a slow check (running code, say)
does not stall the event loop. To mark an iterate it could not judge, it raises ``EvaluatorError``:
that iterate keeps ``score=None`` and a ``failure`` message and is left out of ``best``; it is never
counted as 0. Any other exception is a bug in the evaluator and propagates.

``best`` is the highest-scoring iterate, the EARLIEST one on ties: the greedy "keep the best so far"
rule, where a later iterate must be strictly better to replace it, so an answer that was already
right is not traded for a rewrite that merely scores the same. It is None without an evaluator (or
when every score failed); ``final`` is always the last iterate.

Context. A step whose prompt (the request plus the latest iterate) would leave less than
``MIN_ANSWER_TOKENS`` of the model's context for the answer is not sent: ``improve`` returns the
iterates so far with ``stopped_early`` set. Each answer's ``max_tokens`` is capped to the room left.

Tools. ``tools=[fn, ...]`` are typed Python functions (``exitagent.function_tools``, the same tools
an ``Environment`` takes) and ``python=True`` adds a sandboxed Python tool (``sandboxes``; opened
on first use, closed by ``aclose``). Then every answer, in ``respond`` and in each ``improve``
step, is a multi-turn episode: the model calls tools (``<tool>{json}</tool>``) until it answers
without a call or ``max_turns`` is hit; an improve step is a fresh episode shown the latest answer.

Learning from the app. ``respond(request)`` answers and returns a ``Reply`` with an
``episode_id``; with a ``recorder`` (``exitagent.recorder.Recorder``: a run directory or store URL)
the episode, token ids and behaviour logprobs included, is kept until the app reports how good the
answer was: ``await agent.feedback(reply.episode_id, reward)``. When a recorded episode becomes a
trainable group is the recorder's rule (its docstring). ``policy_version()`` reads the version the
server serves, and ``async for version in agent.versions():`` yields it each time it changes.
"""

from __future__ import annotations

import inspect
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Literal, Protocol

import anyio
import structlog

from exitagent.client import UNKNOWN, OpenAIPolicy
from exitagent.errors import ConfigError, ExitAgentError, ServerError, score_or_failure
from exitagent.function_tools import FunctionTool, function_tool
from exitagent.loop import EpisodeLimits, run_group
from exitagent.policy import TRAINING_TEMPERATURE, Policy, SamplingParams, room
from exitagent.prompts import step_messages
from exitagent.rollouts import CUT_OFF
from exitagent.tools import PythonTool, Tool, Toolbox
from exitagent.types import Episode, Message, PolicyVersion, Sample, Score, StepKind, StopReason, Task
from sandboxes.base import Sandbox
from sandboxes.factory import open_sandbox

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


async def improve(policy: Policy, request: str, *, steps: int = 4, mode: Mode = "improve",
                  params: SamplingParams = AGENT_PARAMS, evaluator: TextEvaluator | None = None,
                  tools: AgentTools | None = None) -> Improvement:
    """y^0 for ``request``, then ``steps`` improve (or diverge) steps, each iterate scored when asked.
    With ``tools`` each iterate is a multi-turn episode (``AgentTools.episodes``)."""
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {sorted(MODES)}, not {mode!r}")
    if steps < 0:
        raise ConfigError(f"steps must be >= 0, not {steps}")
    scorer = None if evaluator is None else TextScorer(evaluator)
    iterates: list[Iterate] = []
    for step in range(steps + 1):
        current = iterates[-1].text if iterates else None
        messages = iterate_messages(MODES[mode], request, current)
        iterate = await (_tool_iterate(policy, tools, request, messages, params, step) if tools
                         else _text_iterate(policy, messages, params, step))
        if iterate is None:
            log.info("improve_stopped_early", step=step, reason="context_full")
            break
        iterates.append(await _scored(iterate, scorer) if scorer and not iterate.failure else iterate)
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
    if episode.failure:  # a bug that model text reached (loop.run_episode_or_crash): said, not scored
        return Iterate(step, episode.final_text, failure=episode.failure, finish_reason="crashed")
    return Iterate(step, episode.final_text, finish_reason="length" if episode.stop_reason in CUT_OFF else "stop",
                   messages=episode.messages[len(prompt):])


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
    return "app-" + uuid.uuid5(uuid.NAMESPACE_URL, request).hex[:16]


async def _scored(iterate: Iterate, scorer: TextScorer) -> Iterate:
    score, failure = await score_or_failure(scorer(iterate.text), "iterate_scoring_failed", limit=500,
                                            step=iterate.step)
    return replace(iterate, failure=failure) if failure else replace(iterate, score=score)


class FeedbackError(ExitAgentError):
    """Feedback the agent cannot take: no recorder, an unknown episode, one already recorded, a bad reward."""


@dataclass(frozen=True)
class Reply:
    """One answer to the app. ``episode_id`` is what ``feedback`` takes; ``group_ids`` are the other
    episodes sampled for the same request when the recorder asked for a group (the app may score
    them too; see ``exitagent.recorder``)."""

    episode_id: str
    text: str
    version: PolicyVersion  # the policy that wrote it
    stop_reason: StopReason
    messages: tuple[Message, ...] = ()  # the episode after the request: tool calls, results, the answer
    group_ids: tuple[str, ...] = ()


class EpisodeRecorder(Protocol):
    """Where the app's episodes go to become training data (``exitagent.recorder.Recorder``)."""

    def group_size(self) -> int:
        """How many answers to sample for the next request (1, or G for a trainable group)."""
        ...

    async def open(self, request: str, head: int, episodes: Sequence[Episode]) -> list[str]:
        """Keep ``episodes`` (the first is served; ``head`` messages precede the answer) until their
        rewards arrive; their ids, in order."""
        ...

    async def feedback(self, episode_id: str, reward: float | Score) -> None: ...


class SelfImprovingAgent:
    """A policy behind an OpenAI-compatible URL that improves its own answers (module docstring).

    Give ``base_url`` (and ``model``, ``api_key`` as the server wants), or ``policy``: any object
    with the ``Policy`` seam (tests inject ``ScriptedPolicy``). Use ``async with`` or ``await
    aclose()`` to close the HTTP connections (and the sandbox) of the async methods; ``improve_sync``
    opens and closes its own each call (an event loop's connections cannot outlive it).
    """

    def __init__(self, base_url: str | None = None, model: str = "policy", api_key: str | None = None,
                 params: SamplingParams = AGENT_PARAMS, *, max_context: int = 2048, deadline_s: float = 60.0,
                 policy: Policy | None = None, tools: Sequence[Callable[..., Any]] = (), python: bool = False,
                 system_prompt: str = "", max_turns: int = 6, tool_timeout_s: float = 10.0,
                 recorder: EpisodeRecorder | None = None) -> None:
        if (base_url is None) == (policy is None):
            raise ConfigError("SelfImprovingAgent needs a base_url or a policy (exactly one)")
        if max_turns < 1:
            raise ConfigError(f"max_turns must be >= 1, not {max_turns}")
        self.params = params
        self.recorder = recorder
        self._connect = None if base_url is None else partial(
            OpenAIPolicy, base_url, model=model, api_key=api_key, require_token_ids=recorder is not None,
            max_context=max_context, deadline_s=deadline_s)
        self._policy = policy
        self._owned: OpenAIPolicy | None = None
        functions = tuple(function_tool(fn, timeout_s=tool_timeout_s) for fn in tools)
        if len({f.name for f in functions} | ({"python"} if python else set())) < len(functions) + python:
            raise ConfigError(f"two tools share a name: {sorted(f.name for f in functions)}")
        self._python = python
        self._tools = AgentTools(functions, None, system_prompt, max_turns) if functions or python else None
        self._stack = AsyncExitStack()

    def _current_policy(self) -> Policy:
        if self._policy is None:
            assert self._connect is not None
            self._policy = self._owned = self._connect()
        return self._policy

    async def _current_tools(self) -> AgentTools | None:
        """The tools, the sandbox opened on first use (``aclose`` closes it)."""
        if self._tools is not None and self._python and self._tools.sandbox is None:
            self._tools.sandbox = await self._stack.enter_async_context(open_sandbox())
        return self._tools

    async def improve(self, request: str, *, steps: int = 4, mode: Mode = "improve",
                      evaluator: TextEvaluator | None = None) -> Improvement:
        """y^0, then ``steps`` revisions of the latest iterate; see ``Improvement`` and the module doc."""
        return await improve(self._current_policy(), request, steps=steps, mode=mode, params=self.params,
                             evaluator=evaluator, tools=await self._current_tools())

    async def respond(self, request: str) -> Reply:
        """One answer (with tools: one episode). With a recorder it is kept for ``feedback``; when the
        recorder asks for a group, G answers are sampled in one request and the first is served."""
        policy, tools = self._current_policy(), await self._current_tools()
        n = self.recorder.group_size() if self.recorder is not None else 1
        prompt = (*(tools.system() if tools else ()), Message("user", request))
        if room(policy, prompt) < MIN_ANSWER_TOKENS:
            raise ConfigError(f"the request alone leaves under {MIN_ANSWER_TOKENS} tokens of the model's context")
        plain = AgentTools((), max_turns=1)  # no tools: one turn, the same group path
        episodes = await (tools or plain).episodes(policy, request, prompt, self.params, n=n)
        if not episodes or not episodes[0].turns:
            raise ConfigError("the server returned no answer (the prompt left no room)")
        served = episodes[0]
        ids = await self.recorder.open(request, len(prompt), episodes) if self.recorder is not None else []
        log.info("agent_responded", episode_id=ids[0] if ids else "", sampled=len(episodes),
                 turns=len(served.turns), stop=served.stop_reason.value)
        return Reply(ids[0] if ids else uuid.uuid4().hex, served.final_text, served.turns[0].sample.version,
                     served.stop_reason, served.messages[len(prompt):], tuple(ids[1:]))

    async def feedback(self, episode_id: str, reward: float | Score) -> None:
        """The app's verdict on an answer it was served: recorded, and trained on once its group is
        complete (``exitagent.recorder``). ``FeedbackError`` for an unknown or already-recorded episode."""
        if self.recorder is None:
            raise FeedbackError("this agent has no recorder: give SelfImprovingAgent(recorder=Recorder(run_dir))")
        await self.recorder.feedback(episode_id, reward)

    async def policy_version(self) -> PolicyVersion:
        """The version the server serves now (``exitagent.serve``'s ``/policy``); ``unknown`` elsewhere."""
        policy = self._current_policy()
        read = getattr(policy, "policy_version", None)
        if callable(read):
            return await read()
        version = getattr(policy, "version", UNKNOWN)  # a fake policy with a fixed version
        return version if isinstance(version, PolicyVersion) else UNKNOWN

    async def versions(self, interval_s: float = 5.0) -> AsyncIterator[PolicyVersion]:
        """The served version now, then each time it changes (polled every ``interval_s``; a server
        that does not answer is logged and asked again next time)::

            async for version in agent.versions():
                print("now talking to", version)
        """
        if interval_s <= 0:
            raise ConfigError(f"interval_s must be > 0, not {interval_s}")
        last: PolicyVersion | None = None
        while True:
            now: PolicyVersion | None = None
            try:
                now = await self.policy_version()
            except ServerError as error:
                log.warning("policy_version_unavailable", error=str(error)[:200])
            if now is not None and (last is None or (now.step, now.name) != (last.step, last.name)):
                last = now
                yield now
            await anyio.sleep(interval_s)

    def improve_sync(self, request: str, *, steps: int = 4, mode: Mode = "improve",
                     evaluator: TextEvaluator | None = None) -> Improvement:
        """``improve`` for code without an event loop (it runs one; not callable from inside one)."""
        return anyio.run(partial(self._improve_once, request, steps=steps, mode=mode, evaluator=evaluator))

    async def _improve_once(self, request: str, *, steps: int, mode: Mode,
                            evaluator: TextEvaluator | None) -> Improvement:
        try:
            if self._connect is None:  # an injected policy: the caller owns its lifetime
                return await self.improve(request, steps=steps, mode=mode, evaluator=evaluator)
            async with self._connect() as policy:
                return await improve(policy, request, steps=steps, mode=mode, params=self.params,
                                     evaluator=evaluator, tools=await self._current_tools())
        finally:
            await self._close_tools()  # the sandbox belongs to this call's event loop

    async def _close_tools(self) -> None:
        await self._stack.aclose()
        if self._tools is not None:
            self._tools.sandbox = None

    async def aclose(self) -> None:
        await self._close_tools()
        if self._owned is not None:
            await self._owned.aclose()
            self._owned = self._policy = None

    async def __aenter__(self) -> SelfImprovingAgent:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()
