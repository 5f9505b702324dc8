"""Evaluation trajectories: a first attempt, then K improve steps, every iterate scored.

The shape ``evaluate`` measures (exit-spec.md section 7) and every domain returns: a task's n
trajectories of K + 1 ``Step``s. ``run_task`` builds them for domains whose step is "answer the
request given the latest iterate" (math; any single-turn domain), through an ``Attempt``; domains
with a different search (MLE's greedy scaffold, multi-turn tool use) build ``TaskResult``s their
own way and may add per-trajectory ``metrics``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import anyio
import structlog

from evaluators.base import Evaluator
from exitagent.errors import ConfigError, ServerError, score_or_failure
from exitagent.iterates import iterate_messages, sample_step
from exitagent.policy import Policy, SamplingParams
from exitagent.types import Sample, StepKind, Task

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Step:
    """One iterate of a trajectory. ``score`` None: the evaluator failed on it."""

    text: str
    score: float | None
    version: str
    truncated: bool = False
    context_full: bool = False  # not generated: ``text`` is the previous iterate, carried over
    failure: str = ""
    # Other scores of the same iterate, by name, reported beside ``score`` with their own curve and
    # intervals (tool use: all-requests accuracy beside the first-request headline). None: failed.
    secondary: Mapping[str, float | None] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskResult:
    """A task's n trajectories, each K + 1 steps, and domain extras averaged over tasks
    (``metrics``: e.g. tool use's first-request accuracy; keys are the domain's own)."""

    task: Task
    trajectories: tuple[tuple[Step, ...], ...]
    metrics: Mapping[str, float] = field(default_factory=dict)


# One step of a trajectory: n answers to the task given the latest iterate (None: the first
# attempt), or None when the prompt would not fit the context.
Attempt = Callable[[Policy, Task, str | None, int, SamplingParams], Awaitable[list[Sample] | None]]


async def single_turn_attempt(policy: Policy, task: Task, current: str | None, n: int,
                              params: SamplingParams) -> list[Sample] | None:
    """The plain request, or an improve step on the latest iterate (one request for ``n``)."""
    return await sample_step(policy, iterate_messages(StepKind.IMPROVE, task.prompt, current), params, n=n)


async def score_step(evaluator: Evaluator, task: Task, sample: Sample) -> Step:
    """``sample`` scored; an ``EvaluatorError`` leaves the score None with the reason, never 0."""
    score, failure = await score_or_failure(evaluator.score(task, sample.text), "iterate_scoring_failed",
                                            task_id=task.id)
    return Step(sample.text, None if score is None else score.total, str(sample.version),
                sample.finish_reason == "length", failure=failure)


async def _trajectory(policy: Policy, evaluator: Evaluator, attempt: Attempt, task: Task, first: Step,
                      steps: int, params: SamplingParams, tick: Callable[[int], object]) -> tuple[Step, ...]:
    out = [first]
    for _ in range(steps):
        samples = await attempt(policy, task, out[-1].text, 1, params)
        if samples is None:  # no room to revise: the latest iterate stands (and keeps its score)
            out.append(Step(out[-1].text, out[-1].score, "", context_full=True, failure=out[-1].failure))
        else:
            out.append(await score_step(evaluator, task, samples[0]))
        tick(1)
    return tuple(out)


async def run_task(policy: Policy, evaluator: Evaluator, task: Task, *, steps: int, samples: int,
                   params: SamplingParams, tick: Callable[[int], object],
                   attempt: Attempt = single_turn_attempt) -> TaskResult:
    """``samples`` first attempts in one request, then ``steps`` improve steps for each, all scored."""
    firsts = await attempt(policy, task, None, samples, params)
    while firsts is not None and len(firsts) < samples:  # some compatible servers ignore n and answer once
        more = await attempt(policy, task, None, samples - len(firsts), params)
        if not more:
            raise ServerError(f"the policy server returned no answer for task {task.id}")
        firsts = [*firsts, *more]
    if firsts is None:
        raise ConfigError(f"task {task.id}: the request alone does not fit the context; raise --max-context")
    trajectories: list[tuple[Step, ...]] = [()] * samples

    async def one(index: int) -> None:
        first = await score_step(evaluator, task, firsts[index])
        tick(1)
        trajectories[index] = await _trajectory(policy, evaluator, attempt, task, first, steps, params, tick)

    async with anyio.create_task_group() as group:
        for index in range(samples):
            group.start_soon(one, index)
    log.debug("task_evaluated", task_id=task.id, scores=[[s.score for s in t] for t in trajectories])
    return TaskResult(task, tuple(trajectories))
