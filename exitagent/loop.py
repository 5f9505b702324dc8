"""The agent loop: one episode of a task against a policy, with tools, under limits.

``run_episode`` is the whole loop; ``run_group`` starts G episodes from one prompt with a single
``n=G`` request and lets each continue on its own. Model mistakes (bad calls, failing code) are fed
back as tool messages and counted; the episode always ends with a ``StopReason``.
``run_episode_or_crash`` is what collectors call: an unexpected exception inside one episode (a
bug that model text reached) ends that episode as ``CRASHED`` instead of taking its group and the
collector down; an ``ExitAgentError`` (a dead server, a missing sandbox) still raises.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace

import anyio
import structlog

from exitagent.errors import ExitAgentError
from exitagent.policy import DEFAULT_PARAMS, Policy, SamplingParams
from exitagent.policy import room as context_room
from exitagent.records import token_sequences
from exitagent.tools import Toolbox, parse_action
from exitagent.types import Episode, Message, Sample, StopReason, Task, Turn

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class EpisodeLimits:
    """Bounds of one episode (the per-turn token cap is ``SamplingParams.max_tokens``)."""

    max_turns: int = 10
    max_total_tokens: int = 4096  # completion tokens over the whole episode
    wall_s: float = 600.0
    min_turn_tokens: int = 16  # stop rather than ask for a turn shorter than this


async def run_episode(task: Task, policy: Policy, tools: Toolbox, messages: Sequence[Message], *,
                      limits: EpisodeLimits = EpisodeLimits(), params: SamplingParams = DEFAULT_PARAMS,
                      first: Sample | None = None) -> Episode:
    """Run until the model answers without a tool call, writes a stop marker, or a limit is hit."""
    history, turns, errors = list(messages), list[Turn](), Counter[str]()
    deadline, spent, stop = time.monotonic() + limits.wall_s, 0, StopReason.MAX_TURNS
    # exact after each turn (the server's token ids), estimated only for the new tool messages
    context = sum(policy.estimate_tokens(m.content) for m in history)
    while len(turns) < limits.max_turns:
        room, left = policy.max_context - context, limits.max_total_tokens - spent
        budget = min(params.max_tokens, room, left)
        # If this turn gets cut off, say which limit cut it.
        cut = StopReason.CONTEXT_FULL if budget == room else StopReason.MAX_TOKENS if budget == left \
            else StopReason.TRUNCATED
        if budget < limits.min_turn_tokens:
            stop = cut
            break
        with anyio.move_on_after(deadline - time.monotonic()) as clock:
            sample = first or (await policy.sample(history, params=replace(params, max_tokens=budget),
                                                   tools=tools.server_tools()))[0]
            first, spent = None, spent + len(sample.completion_ids)
            action = parse_action(sample.text, sample.tool_calls)
            history.append(Message("assistant", sample.text, tool_calls=action.calls))
            results, kinds = await tools.respond(action)  # the toolbox's rules: calls per turn, actions
            errors.update(kinds)
            history += results
            turns.append(Turn(sample, tuple(results)))
            seen = len(sample.prompt_ids) + len(sample.completion_ids) if sample.prompt_ids else \
                sum(policy.estimate_tokens(m.content) for m in history)  # a server without token ids
            context = seen + sum(policy.estimate_tokens(m.content) for m in results)
        if clock.cancelled_caught:
            stop = StopReason.WALL_CLOCK
            break
        if sample.finish_reason == "length" and not results:
            stop = cut
            break
        if action.gave_up or action.finished or not results:
            stop = StopReason.GAVE_UP if action.gave_up else StopReason.FINISHED if action.finished \
                else StopReason.ANSWERED
            break
    metrics = {"turns": float(len(turns)), "completion_tokens": float(spent),
               "tool_calls": float(sum(len(parse_action(t.sample.text, t.sample.tool_calls).calls) for t in turns)),
               **{f"tool_error_{kind}": float(count) for kind, count in errors.items()}}
    return Episode(task, tuple(history), tuple(turns), stop, token_sequences(turns), metrics)


async def run_episode_or_crash(task: Task, policy: Policy, tools: Toolbox, messages: Sequence[Message], *,
                               limits: EpisodeLimits = EpisodeLimits(), params: SamplingParams = DEFAULT_PARAMS,
                               first: Sample | None = None) -> Episode:
    """``run_episode``, but an unexpected exception gives a ``CRASHED`` episode (its first sample
    kept for the group's version) with the error in ``failure``; infrastructure errors raise."""
    try:
        return await run_episode(task, policy, tools, messages, limits=limits, params=params, first=first)
    except ExitAgentError:
        raise
    except Exception as error:  # a bug met by one rollout: it fails, its group and collector go on
        failure = f"crashed: {type(error).__name__}: {str(error)[:300]}"
        log.error("episode_crashed", task_id=task.id, error=failure, exc_info=True)
        turns = (Turn(first),) if first is not None else ()
        # No training sequences: a crashed rollout is never trained on, and its sample may be what raised.
        return Episode(task, tuple(messages), turns, StopReason.CRASHED, (), {"crashed": 1.0}, failure=failure)


async def run_group(task: Task, policy: Policy, tools: Toolbox | Sequence[Toolbox], messages: Sequence[Message],
                    n: int, *, limits: EpisodeLimits = EpisodeLimits(), params: SamplingParams = DEFAULT_PARAMS,
                    prompt: Sequence[Message] | None = None) -> list[Episode]:
    """G episodes from one prompt: the first turns come from one request with ``n=G``.

    ``tools`` is one toolbox for all, or one per episode (each rollout its own state). ``prompt``
    (default ``messages``) is what the first request shows, e.g. an improve prompt; each episode
    then continues from ``messages`` with its first answer.
    """
    toolboxes = [tools] * n if isinstance(tools, Toolbox) else list(tools)
    prompt = messages if prompt is None else prompt
    room = context_room(policy, prompt)
    budget = min(params.max_tokens, limits.max_total_tokens, room)
    if budget < limits.min_turn_tokens:  # not even one short answer fits: every episode stops at once
        return [Episode(task, tuple(messages), (), StopReason.CONTEXT_FULL, ()) for _ in range(n)]
    firsts = await policy.sample(prompt, n=n, params=replace(params, max_tokens=budget),
                                 tools=toolboxes[0].server_tools() if toolboxes else None)
    episodes: list[Episode | None] = [None] * n

    async def continue_one(index: int) -> None:
        episodes[index] = await run_episode_or_crash(task, policy, toolboxes[index], messages, limits=limits,
                                                     params=params, first=firsts[index])

    async with anyio.create_task_group() as group:
        for index in range(min(n, len(firsts))):
            group.start_soon(continue_one, index)
    return [episode for episode in episodes if episode is not None]
