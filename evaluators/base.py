"""The evaluator seam: one async method that turns a response to a task into a ``Score``.

A wrong, empty or unparseable answer is the model's mistake and scores 0. An evaluator that cannot
do its job (its checker crashed or ran out of time, the gold answer is unusable) raises
``EvaluatorError``: the caller counts it and keeps the rollout out of training, and never turns it
into a 0 (exit-spec section 4, style principle 6).

``ExactMatchEvaluator`` is the fake that other parts' tests and dry runs use: exact match against
``task.answer``, with scripted failures.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol, runtime_checkable

import structlog

from exitagent.errors import EvaluatorError
from exitagent.types import Score, Task

log = structlog.get_logger(__name__)


@runtime_checkable
class Evaluator(Protocol):
    """Scores one response. Raises ``EvaluatorError`` for its own failures, never returns a fake 0."""

    async def score(self, task: Task, response: str) -> Score: ...


class ExactMatchEvaluator:
    """Fake evaluator: 1.0 when the stripped response equals ``str(task.answer)``, else 0.0.

    ``failing`` lists responses for which the evaluator itself "fails" (raises ``EvaluatorError``),
    so tests can drive the path where a rollout is excluded. ``calls`` records every
    ``(task id, response)`` scored, in order.
    """

    def __init__(self, *, failing: Collection[str] = ()) -> None:
        self.failing = frozenset(failing)
        self.calls: list[tuple[str, str]] = []

    async def score(self, task: Task, response: str) -> Score:
        self.calls.append((task.id, response))
        if response in self.failing:
            log.info("evaluator_failed_on_purpose", task_id=task.id)
            raise EvaluatorError(f"scripted evaluator failure for task {task.id}")
        correct = float(response.strip() == str(task.answer).strip())
        return Score(total=correct, components={"correct": correct}, detail=response.strip())
