"""Competition math and generated arithmetic: one answer per turn, graded by math-verify.

A rollout is a single turn: the start's messages (the plain request, or an improve / divergence
prompt on a buffer entry's iterate), G answers in one request, each graded 1 or 0 by
``evaluators.math.MathEvaluator``. An evaluation trajectory is the first answer and K improve steps
(``trajectories.run_task``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import replace

import structlog

from evaluators.base import Evaluator
from evaluators.worlds.math_tasks import MATH_BENCHMARKS, math_tasks
from exitagent.curriculum import Start
from exitagent.domains.base import DomainSettings, TaskSpec
from exitagent.errors import ConfigError
from exitagent.policy import Policy, SamplingParams
from exitagent.policy import room as context_room
from exitagent.rollouts import roll_out
from exitagent.trajectories import TaskResult, run_task
from exitagent.types import Group, Task

log = structlog.get_logger(__name__)

MIN_ANSWER_TOKENS = 16  # a start whose prompt leaves less room than this is re-attempted as a base task
DEFAULT_ARITHMETIC_TASKS = {"train": 5000, "heldout": 100}


def fit_start(policy: Policy, start: Start, params: SamplingParams) -> tuple[Start, SamplingParams]:
    """Shorten ``max_tokens`` to the room the prompt leaves (vLLM rejects a request that overflows);
    a buffer start with no room left is re-attempted as its base task."""

    def room(s: Start) -> int:
        return context_room(policy, s.messages())

    if room(start) < MIN_ANSWER_TOKENS and start.entry is not None:
        log.warning("start_shortened", entry_id=start.entry.id, task_id=start.task.id, room=room(start))
        start = start.base()
    if room(start) < MIN_ANSWER_TOKENS:
        raise ConfigError(f"task {start.task.id} does not fit in a {policy.max_context}-token context")
    return start, replace(params, max_tokens=min(params.max_tokens, room(start)))


class MathDomain:
    name = "math"
    default_source = "arithmetic"  # what --source means when not given

    def load_tasks(self, spec: TaskSpec) -> list[Task]:
        split, n = spec.split, spec.n
        if split == "heldout" and spec.source in (*MATH_BENCHMARKS, "gsm8k"):  # a benchmark's held-out split
            split = "test" if spec.source == "gsm8k" else MATH_BENCHMARKS[spec.source]
        if n is None and spec.source == "arithmetic":
            n = DEFAULT_ARITHMETIC_TASKS["train" if split == "train" else "heldout"]
        return math_tasks(spec.source, split, n, spec.seed, spec.levels)

    def open_evaluator(self, settings: DomainSettings) -> AbstractAsyncContextManager[Evaluator]:
        from evaluators.math import MathEvaluator  # math-verify: only where math is evaluated

        return MathEvaluator(workers=settings.eval_workers, timeout_s=settings.eval_timeout_s)

    async def roll_out(self, start: Start, policy: Policy, evaluator: Evaluator, *, group_size: int,
                       params: SamplingParams, settings: DomainSettings) -> Group:
        start, params = fit_start(policy, start, params)
        rollouts = await roll_out(start.task, start.messages(), policy, evaluator, group_size=group_size, params=params)
        return start.group(rollouts)

    async def evaluate_task(self, policy: Policy, evaluator: Evaluator, task: Task, *, steps: int, samples: int,
                            params: SamplingParams, settings: DomainSettings,
                            tick: Callable[[int], object]) -> TaskResult:
        return await run_task(policy, evaluator, task, steps=steps, samples=samples, params=params, tick=tick)
