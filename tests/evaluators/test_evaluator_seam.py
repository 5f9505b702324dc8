"""The Evaluator protocol and its exact-match fake."""

from __future__ import annotations

import pytest

from evaluators.base import Evaluator, ExactMatchEvaluator
from evaluators.math import MathEvaluator
from exitagent.errors import EvaluatorError
from exitagent.types import Task

TASK = Task(id="t1", domain="math", prompt="What is 2 + 2?", answer="4")


def test_both_evaluators_satisfy_the_protocol() -> None:
    assert isinstance(ExactMatchEvaluator(), Evaluator)
    with MathEvaluator(workers=1) as evaluator:  # no worker starts until a check needs one
        assert isinstance(evaluator, Evaluator)


@pytest.mark.anyio
async def test_fake_scores_exact_match_and_records_calls() -> None:
    fake = ExactMatchEvaluator()
    right = await fake.score(TASK, " 4\n")
    wrong = await fake.score(TASK, "5")
    assert (right.total, right.components["correct"], right.detail) == (1.0, 1.0, "4")
    assert (wrong.total, wrong.components["correct"]) == (0.0, 0.0)
    assert fake.calls == [("t1", " 4\n"), ("t1", "5")]


@pytest.mark.anyio
async def test_fake_raises_on_scripted_failures_only() -> None:
    fake = ExactMatchEvaluator(failing={"boom"})
    with pytest.raises(EvaluatorError, match="t1"):
        await fake.score(TASK, "boom")
    assert (await fake.score(TASK, "4")).total == 1.0
