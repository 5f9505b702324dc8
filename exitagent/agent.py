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
answer was: ``await agent.feedback(reply.episode_id, reward)``. ``improve`` is recorded too: each
step is a group that starts from the step's prompt (step k an IMPROVE or DIVERGE group of depth
k, as in ExIt); ``Iterate.episode_id`` is what ``feedback`` takes, and with an ``evaluator`` its
score is the reward already. When a recorded episode becomes a trainable group is the recorder's
rule (its docstring). ``policy_version()`` reads the version the
server serves, and ``async for version in agent.versions():`` yields it each time it changes.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio
import structlog

from exitagent.client import UNKNOWN, OpenAIPolicy
from exitagent.errors import ConfigError, ExitAgentError, ServerError
from exitagent.function_tools import function_tool
from exitagent.iterates import (
    AGENT_PARAMS,
    MIN_ANSWER_TOKENS,
    AgentTools,
    EpisodeRecorder,
    Improvement,
    Iterate,
    Mode,
    TextEvaluator,
    improve,
)
from exitagent.policy import Policy, SamplingParams, room
from exitagent.types import Message, PolicyVersion, Score, StopReason
from sandboxes.factory import open_sandbox

__all__ = ["FeedbackError", "Improvement", "Iterate", "Reply", "SelfImprovingAgent"]  # the loop: ``iterates``

log = structlog.get_logger(__name__)


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
                             evaluator=evaluator, tools=await self._current_tools(), recorder=self.recorder)

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
                                     evaluator=evaluator, tools=await self._current_tools(), recorder=self.recorder)
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
