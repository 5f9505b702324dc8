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
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Literal

import anyio
import structlog

from exitagent.client import OpenAIPolicy
from exitagent.errors import ConfigError, score_or_failure
from exitagent.policy import TRAINING_TEMPERATURE, Policy, SamplingParams, room
from exitagent.prompts import step_messages
from exitagent.types import Message, Sample, Score, StepKind

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
                  params: SamplingParams = AGENT_PARAMS, evaluator: TextEvaluator | None = None) -> Improvement:
    """y^0 for ``request``, then ``steps`` improve (or diverge) steps, each iterate scored when asked."""
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {sorted(MODES)}, not {mode!r}")
    if steps < 0:
        raise ConfigError(f"steps must be >= 0, not {steps}")
    scorer = None if evaluator is None else TextScorer(evaluator)
    iterates: list[Iterate] = []
    for step in range(steps + 1):
        current = iterates[-1].text if iterates else None
        samples = await sample_step(policy, iterate_messages(MODES[mode], request, current), params)
        if samples is None:
            log.info("improve_stopped_early", step=step, reason="context_full")
            break
        iterate = Iterate(step, samples[0].text, finish_reason=samples[0].finish_reason)
        iterates.append(await _scored(iterate, scorer) if scorer else iterate)
    if not iterates:
        raise ConfigError(f"the request alone leaves under {MIN_ANSWER_TOKENS} tokens of the model's context")
    result = Improvement(request, mode, tuple(iterates), scorer is not None, len(iterates) < steps + 1)
    log.info("improve_finished", mode=mode, steps=len(iterates) - 1, stopped_early=result.stopped_early,
             scores=[it.score for it in iterates] if scorer else None)
    return result


async def _scored(iterate: Iterate, scorer: TextScorer) -> Iterate:
    score, failure = await score_or_failure(scorer(iterate.text), "iterate_scoring_failed", limit=500,
                                            step=iterate.step)
    return replace(iterate, failure=failure) if failure else replace(iterate, score=score)


class SelfImprovingAgent:
    """A policy behind an OpenAI-compatible URL that improves its own answers (module docstring).

    Give ``base_url`` (and ``model``, ``api_key`` as the server wants), or ``policy``: any object
    with the ``Policy`` seam (tests inject ``ScriptedPolicy``). Use ``async with`` or ``await
    aclose()`` to close the HTTP connections of the async methods; ``improve_sync`` opens and
    closes its own each call (an event loop's connections cannot outlive it).
    """

    def __init__(self, base_url: str | None = None, model: str = "policy", api_key: str | None = None,
                 params: SamplingParams = AGENT_PARAMS, *, max_context: int = 2048, deadline_s: float = 60.0,
                 policy: Policy | None = None) -> None:
        if (base_url is None) == (policy is None):
            raise ConfigError("SelfImprovingAgent needs a base_url or a policy (exactly one)")
        self.params = params
        self._connect = None if base_url is None else partial(
            OpenAIPolicy, base_url, model=model, api_key=api_key, require_token_ids=False,
            max_context=max_context, deadline_s=deadline_s)
        self._policy = policy
        self._owned: OpenAIPolicy | None = None

    def _current_policy(self) -> Policy:
        if self._policy is None:
            assert self._connect is not None
            self._policy = self._owned = self._connect()
        return self._policy

    async def improve(self, request: str, *, steps: int = 4, mode: Mode = "improve",
                      evaluator: TextEvaluator | None = None) -> Improvement:
        """y^0, then ``steps`` revisions of the latest iterate; see ``Improvement`` and the module doc."""
        return await improve(self._current_policy(), request, steps=steps, mode=mode, params=self.params,
                             evaluator=evaluator)

    def improve_sync(self, request: str, *, steps: int = 4, mode: Mode = "improve",
                     evaluator: TextEvaluator | None = None) -> Improvement:
        """``improve`` for code without an event loop (it runs one; not callable from inside one)."""
        return anyio.run(partial(self._improve_once, request, steps=steps, mode=mode, evaluator=evaluator))

    async def _improve_once(self, request: str, *, steps: int, mode: Mode,
                            evaluator: TextEvaluator | None) -> Improvement:
        if self._connect is None:  # an injected policy: the caller owns its lifetime
            return await self.improve(request, steps=steps, mode=mode, evaluator=evaluator)
        async with self._connect() as policy:
            return await improve(policy, request, steps=steps, mode=mode, params=self.params, evaluator=evaluator)

    async def aclose(self) -> None:
        if self._owned is not None:
            await self._owned.aclose()
            self._owned = self._policy = None

    async def __aenter__(self) -> SelfImprovingAgent:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()
