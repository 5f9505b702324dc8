"""One group of a collect run: G responses to one start, scored, tagged with the policy that made them.

``roll_out`` is what the collector does for every start it chooses (exit-spec.md section 2, steps
3 and 4, plus the diversity bonus of section 4)::

    episodes = run_group(...)          # one request with n=G; math: one turn, no tools
    rollouts = score_rollouts(...)     # the evaluator's verdicts
    rollouts = with_diversity(...)     # collect, full ExIt only: advantage multipliers per response
    group    = start.group(rollouts)   # the domain's Group, tagged with the OLDEST policy version of its samples

A wrong or truncated answer is the model's mistake and gets the evaluator's reward (usually 0).
An evaluator that raises ``EvaluatorError`` (it crashed or ran out of time) marks its rollout
failed: the rollout is kept for the record with ``reward=None``, counted, and left out of training
and of the curriculum score; it is never turned into a 0. A rollout whose episode crashed
(``StopReason.CRASHED``: an unexpected exception, see ``loop.run_episode_or_crash``) or whose
evaluator raised something unexpected is failed the same way.

The store keeps no stop reason per rollout, so a ``truncated`` component (1.0 when the response
hit its token limit or the context) is added to each score: the trainer's ``TrainItem.truncated``.

``roll_out`` returns the scored rollouts; the domain makes them its ``Group`` (``Start.group``),
the one group type from here to the store.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace

import anyio
import structlog

from evaluators.base import Evaluator
from exitagent.diversity import Embedder, diversity_multipliers
from exitagent.errors import ExitAgentError, score_or_failure
from exitagent.loop import EpisodeLimits, run_group
from exitagent.policy import Policy, SamplingParams
from exitagent.tools import Toolbox
from exitagent.types import CUT_OFF, Episode, Message, Rollout, Score, StopReason, Task

log = structlog.get_logger(__name__)

async def score_rollouts(evaluator: Evaluator, task: Task, episodes: Sequence[Episode]) -> list[Rollout]:
    """Each episode's final text scored; ``EvaluatorError`` makes a failed rollout, not a 0."""
    rollouts: list[Rollout | None] = [None] * len(episodes)

    async def score_one(index: int, episode: Episode) -> None:
        rollouts[index] = await score_rollout(evaluator, task, episode, episode.final_text, index=index)

    async with anyio.create_task_group() as group:
        for index, episode in enumerate(episodes):
            group.start_soon(score_one, index, episode)
    return [r for r in rollouts if r is not None]


async def score_rollout(evaluator: Evaluator, task: Task, episode: Episode, response: str,
                        **context: object) -> Rollout:
    """``response`` scored; a crashed episode, an ``EvaluatorError`` or an unexpected exception from the
    evaluator makes a failed rollout (reward None), logged, never a 0."""
    if episode.stop_reason is StopReason.CRASHED:
        return Rollout(episode, None, None, failure=episode.failure)
    try:
        score, failure = await score_or_failure(evaluator.score(task, response), "rollout_evaluation_failed",
                                                limit=500, task_id=task.id, **context)
    except ExitAgentError:
        raise
    except Exception as error:  # an evaluator bug that model text reached: this rollout fails, not the run
        log.error("rollout_evaluation_crashed", task_id=task.id, error=repr(error)[:200], exc_info=True, **context)
        return Rollout(episode, None, None, failure=f"evaluator crashed: {type(error).__name__}: {str(error)[:300]}")
    if score is None:
        return Rollout(episode, None, None, failure=failure)
    cut = float(episode.stop_reason in CUT_OFF)
    score = Score(score.total, {**score.components, "truncated": cut}, score.detail)
    return Rollout(episode, score, score.total)


async def with_diversity(embedder: Embedder, rollouts: Sequence[Rollout], lock: anyio.Lock,
                         norm: str = "range") -> list[Rollout]:
    """Diversity multipliers over the group's scored responses (failed ones keep 1.0: they are
    not trained on, so they must not move the centroid the others are measured from)."""
    scored = [i for i, r in enumerate(rollouts) if r.reward is not None]
    texts = [rollouts[i].episode.final_text for i in scored]
    async with lock:  # one embedding at a time: the model is CPU-bound and loads on first use
        values = await anyio.to_thread.run_sync(diversity_multipliers, embedder, texts, norm)
    out = list(rollouts)
    for i, value in zip(scored, values, strict=True):
        out[i] = replace(out[i], diversity=value)
    return out


ScoreOne = Callable[[int, Episode], Awaitable[Rollout]]  # rollout i scored (tool use: its call record)


async def roll_out(
    task: Task, messages: Sequence[Message], policy: Policy, evaluator: Evaluator, *, group_size: int,
    params: SamplingParams, toolboxes: Sequence[Toolbox] | None = None, limits: EpisodeLimits | None = None,
    prompt: Sequence[Message] | None = None, score: ScoreOne | None = None,
) -> tuple[Rollout, ...]:
    """G responses to one request, scored: THE group path of every domain. (Collect adds the
    diversity bonus, ``with_diversity``, for every domain alike.)

    Single-turn (math) by default: no tools, one turn, each final text judged by ``evaluator``.
    Multi-turn: one toolbox per rollout (each its own state), ``limits`` for the episode, ``prompt``
    for the first request (an improve prompt; then each episode goes on from ``messages``), and
    ``score(i, episode)`` judging rollout i from its own state.
    """
    limits = limits or EpisodeLimits(max_turns=1, max_total_tokens=params.max_tokens)
    toolboxes = toolboxes if toolboxes is not None else [Toolbox()] * group_size
    episodes = await run_group(task, policy, toolboxes, messages, group_size, limits=limits, params=params,
                               prompt=prompt)

    async def plain(index: int, episode: Episode) -> Rollout:
        return await score_rollout(evaluator, task, episode, episode.final_text, index=index)

    rollouts: list[Rollout | None] = [None] * len(episodes)

    async def score_one(index: int) -> None:
        rollouts[index] = await (score or plain)(index, episodes[index])

    async with anyio.create_task_group() as group:
        for index in range(len(episodes)):
            group.start_soon(score_one, index)
    return tuple(r for r in rollouts if r is not None)
