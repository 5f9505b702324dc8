"""The naive control the paper argues against: train on K-step self-improvement chains, K random.

Variant ``chains`` (not one of the paper's five; ``python -m exitagent.collect --variant chains``).
There is no buffer. For each group the collector draws a base task uniformly (``choose_start``, as
GRPO does), then ``grow`` draws K uniformly from 0..``max_depth`` and builds a chain with ONE
sample per step: a first attempt, then K - 1 improve steps, each prompt showing only the request
and the latest iterate (``prompts.step_messages``, as ExIt's improve steps do). The group of G
responses is then an improve step on the chain's last iterate, recorded at depth K with step kind
IMPROVE; K = 0 is a plain base group. So a group at depth K costs K single-sample requests of
generation that is never trained on, plus the group itself.

Why this is the control: ExIt reaches depth only through its buffer, one trained step at a time,
and spends its samples where the group score says there is something to learn. The naive scheme
pays for the whole chain at every group and trains only on its last step. At equal trainer
updates the two differ in what is generated, so the collect metrics count the chain's tokens in
``completion_tokens`` (``exitagent.budget``'s "tokens generated" column shows the real cost).

``max_depth`` default: 4, the depth the main job evaluates (``exitagent.run --eval-steps``), so the
control trains at every depth its own evaluation measures. The paper does not give a K for such a
baseline; its ExIt policies saw under 2 steps on average in math training and are evaluated to
K = 16 (exit-spec.md section 7). Math (single-turn) only: a chain of multi-turn episodes would
need per-turn prefixes, which this control does not model.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, replace

import structlog

from exitagent.curriculum import Start
from exitagent.errors import ConfigError
from exitagent.policy import Policy, SamplingParams
from exitagent.policy import room as context_room
from exitagent.prompts import step_messages
from exitagent.types import Message, StepKind

log = structlog.get_logger(__name__)

DEFAULT_MAX_DEPTH = 4  # the main job's evaluation depth (module docstring)
CHAIN_DOMAINS = ("math",)
# A step whose prompt leaves less room than this is not asked for (as domains.math.MIN_ANSWER_TOKENS):
# the chain ends at the iterate before it.
MIN_ANSWER_TOKENS = 16


def check(domain: str, max_depth: int) -> None:
    """Refuse what this control cannot run, before anything starts."""
    if max_depth < 0:
        raise ConfigError(f"chain-max-depth must be >= 0, not {max_depth}")
    if domain not in CHAIN_DOMAINS:
        raise ConfigError(f"variant 'chains' runs single-turn domains only ({', '.join(CHAIN_DOMAINS)}), "
                          f"not {domain!r}")


@dataclass(frozen=True)
class ChainStart(Start):
    """An improve step on a chain's last iterate. No buffer entry: ``entry`` stays None, so the
    group names no entry and nothing is counted as drawn from a buffer."""

    iterate: str = ""
    chain_depth: int = 0  # K: the number of single-sample requests that built ``iterate``
    chain_tokens: int = 0  # completion tokens those requests generated (never trained on)

    @property
    def depth(self) -> int:
        return self.chain_depth

    def messages(self) -> tuple[Message, ...]:
        return step_messages(self.step_kind, self.task.prompt, (), self.iterate)


def chain_tokens(start: Start) -> int:
    """Tokens generated before ``start``'s group (0 for every start but a chain's)."""
    return start.chain_tokens if isinstance(start, ChainStart) else 0


async def grow(policy: Policy, start: Start, rng: random.Random, max_depth: int,
               sampling: Callable[[StepKind], SamplingParams]) -> Start:
    """``start`` (a base task) with a chain of K = uniform(0..max_depth) single samples in front.

    ``sampling(kind)`` gives each step's parameters (collect's per-kind token limits). The chain is
    shorter than K only where the next prompt would not leave room for an answer; its tokens are
    counted all the same.
    """
    depth = rng.randint(0, max_depth)
    iterates: list[str] = []
    tokens = 0
    for _ in range(depth):
        kind = StepKind.IMPROVE if iterates else StepKind.BASE
        messages = step_messages(kind, start.task.prompt, (), iterates[-1] if iterates else "")
        room = context_room(policy, messages)
        if room < MIN_ANSWER_TOKENS:
            break
        params = sampling(kind)
        params = replace(params, max_tokens=min(params.max_tokens, room))
        sample = (await policy.sample(messages, n=1, params=params))[0]
        iterates.append(sample.text)
        tokens += len(sample.completion_ids)
    # the group's own prompt must leave room too: else it improves an earlier iterate
    while iterates and context_room(policy, step_messages(StepKind.IMPROVE, start.task.prompt, (), iterates[-1])) \
            < MIN_ANSWER_TOKENS:
        iterates.pop()
    log.debug("chain_grown", task_id=start.task.id, drawn=depth, depth=len(iterates), tokens=tokens)
    if not iterates:
        return ChainStart(start.task, StepKind.BASE, variant=start.variant, chain_tokens=tokens) if tokens else start
    return ChainStart(start.task, StepKind.IMPROVE, variant=start.variant, iterate=iterates[-1],
                      chain_depth=len(iterates), chain_tokens=tokens)
