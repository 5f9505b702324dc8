"""MathEvaluator end to end: real math-verify in real worker processes, deadlines, concurrency."""

from __future__ import annotations

import time

import anyio
import pytest

from evaluators.math import EXTRACTORS, MathEvaluator, VerifierPool, math_verify_equivalent
from exitagent.errors import EvaluatorError
from exitagent.types import Task

# Needs sympy, not just arithmetic: each answer below goes past the cheap checks to math-verify.
NEEDS_MATH_VERIFY = (r"\frac{1}{2}", "0.5")


def task(answer: str | None) -> Task:
    return Task(id="t", domain="math", prompt="(problem)", answer=answer)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("gold", "response", "extractor"),
    [
        (r"\frac{1}{2}", r"so \boxed{0.5}", "boxed"),
        (r"\frac{1}{2}", r"The answer is $\dfrac{1}{2}$.", "answer_is"),
        (r"\frac{14}{3}", r"\boxed{14/3}", "boxed"),
        ("1000", r"\boxed{1,000}", "boxed"),
        ("5", r"\boxed{5.}", "boxed"),
        ("72", "3 * 24 = <<3*24=72>>72\n#### 72", "hash"),
        ("18", r"In all she pays \$18.", "last_number"),
        (r"3\sqrt{13}", r"\boxed{\sqrt{117}}", "boxed"),
        ("6 - 5i", r"\boxed{-5i + 6}", "boxed"),
        (r"\left( 3, \frac{\pi}{2} \right)", r"\boxed{(3, \pi/2)}", "boxed"),
        (r"\text{Evelyn}", r"\boxed{Evelyn}", "boxed"),
        (r"90^\circ", r"\boxed{90}", "boxed"),
    ],
)
async def test_equivalent_answers_score_one(
    math_evaluator: MathEvaluator, gold: str, response: str, extractor: str
) -> None:
    score = await math_evaluator.score(task(gold), response)
    assert score.total == 1.0
    assert score.components["correct"] == 1.0
    assert {name for name in EXTRACTORS if score.components[f"extractor_{name}"] == 1.0} == {extractor}


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("gold", "response"),
    [
        (r"\frac{1}{2}", r"\boxed{0.4}"),
        (r"\frac{14}{3}", r"\boxed{\frac{3}{14}}"),
        ("72", r"\boxed{73}"),
        ("1000", "#### 100"),
        (r"\text{Evelyn}", r"\boxed{Bob}"),
        (r"\left( 3, \frac{\pi}{2} \right)", r"\boxed{(\frac{\pi}{2}, 3)}"),  # order matters in a point
        (r"3\sqrt{13}", r"\boxed{\sqrt{13}}"),
        ("18", r"The answer is 18 \boxed{19}"),  # the box wins over the prose
    ],
)
async def test_wrong_answers_score_zero(math_evaluator: MathEvaluator, gold: str, response: str) -> None:
    score = await math_evaluator.score(task(gold), response)
    assert (score.total, score.components["correct"]) == (0.0, 0.0)


@pytest.mark.anyio
async def test_response_without_an_answer_scores_zero_with_no_extractor(math_evaluator: MathEvaluator) -> None:
    score = await math_evaluator.score(task("4"), "I am not sure how to do this.")
    assert score.total == 0.0
    assert score.detail == ""
    assert all(score.components[f"extractor_{name}"] == 0.0 for name in EXTRACTORS)


@pytest.mark.anyio
async def test_detail_holds_the_extracted_answer(math_evaluator: MathEvaluator) -> None:
    score = await math_evaluator.score(task(r"\frac{1}{2}"), r"Thus $\boxed{\dfrac{1}{2}}$.")
    assert score.detail == r"\dfrac{1}{2}"


@pytest.mark.anyio
async def test_overlong_answer_scores_zero_unchecked(math_evaluator: MathEvaluator) -> None:
    score = await math_evaluator.score(task("1"), "\\boxed{" + "1+" * 600 + "0}")
    assert score.total == 0.0
    assert score.components["extractor_boxed"] == 1.0


@pytest.mark.anyio
@pytest.mark.parametrize("gold", [None, "", "  "])
async def test_missing_gold_answer_is_an_evaluator_error(math_evaluator: MathEvaluator, gold: str | None) -> None:
    with pytest.raises(EvaluatorError, match="no gold answer"):
        await math_evaluator.score(task(gold), r"\boxed{1}")


@pytest.mark.anyio
async def test_unparseable_gold_is_an_evaluator_error_and_the_worker_survives(math_evaluator: MathEvaluator) -> None:
    with pytest.raises(EvaluatorError, match="cannot parse the gold answer"):
        await math_evaluator.score(task("}{"), r"\boxed{x+1}")
    assert await math_evaluator.equivalent(*NEEDS_MATH_VERIFY)


@pytest.mark.anyio
async def test_pathological_answer_times_out_and_the_pool_recovers() -> None:
    # sympy tries to evaluate the power tower exactly and never finishes.
    async with MathEvaluator(workers=1, timeout_s=1.0) as evaluator:
        assert await evaluator.equivalent(*NEEDS_MATH_VERIFY)  # warm: the deadline excludes start-up
        started = time.monotonic()
        with pytest.raises(EvaluatorError, match="timed out"):
            await evaluator.score(task("1"), r"\boxed{9^{9^{9^{9}}}}")
        assert time.monotonic() - started < 10
        # The hung worker was killed; a fresh one answers the next call.
        assert await evaluator.equivalent(*NEEDS_MATH_VERIFY)
        assert (await evaluator.score(task(r"\frac{14}{3}"), r"\boxed{14/3}")).total == 1.0


def test_pool_kills_a_slow_call_and_keeps_working() -> None:
    # Generous default deadline: the first math-verify call imports sympy, slow on a loaded machine.
    pool = VerifierPool(workers=1, timeout_s=60)
    try:
        assert pool.run(math_verify_equivalent, *NEEDS_MATH_VERIFY) is True
        with pytest.raises(EvaluatorError, match=r"timed out after 0\.5 s"):
            pool.run(time.sleep, 30, timeout_s=0.5)
        assert pool.run(math_verify_equivalent, "2", "3") is False
    finally:
        pool.close()
    with pytest.raises(EvaluatorError, match="closed"):
        pool.run(math_verify_equivalent, *NEEDS_MATH_VERIFY)


@pytest.mark.anyio
async def test_many_anyio_tasks_score_concurrently(math_evaluator: MathEvaluator) -> None:
    cases = [(rf"\frac{{{i}}}{{{i + 1}}}", rf"\boxed{{\dfrac{{{i}}}{{{i + 1}}}}}", 1.0) for i in range(1, 13)]
    cases += [(rf"\frac{{{i}}}{{{i + 1}}}", rf"\boxed{{\frac{{{i + 1}}}{{{i}}}}}", 0.0) for i in range(1, 13)]
    totals: dict[int, float] = {}

    async def score_one(index: int, gold: str, response: str) -> None:
        totals[index] = (await math_evaluator.score(task(gold), response)).total

    async with anyio.create_task_group() as group:
        for index, (gold, response, _) in enumerate(cases):
            group.start_soon(score_one, index, gold, response)
    assert [totals[i] for i in range(len(cases))] == [expected for _, _, expected in cases]


@pytest.mark.anyio
async def test_two_workers_run_calls_in_parallel(math_evaluator: MathEvaluator) -> None:
    pool = math_evaluator.pool
    async with anyio.create_task_group() as group:  # warm both workers first
        for _ in range(2):
            group.start_soon(anyio.to_thread.run_sync, pool.run, time.sleep, 0.5)
    started = time.monotonic()
    async with anyio.create_task_group() as group:
        for _ in range(2):
            group.start_soon(anyio.to_thread.run_sync, pool.run, time.sleep, 1.0)
    assert time.monotonic() - started < 1.8  # in series it would take 2 s


@pytest.mark.anyio
async def test_cancelled_scorer_returns_promptly_and_the_pool_still_works() -> None:
    async with MathEvaluator(workers=1, timeout_s=3.0) as evaluator:
        assert await evaluator.equivalent(*NEEDS_MATH_VERIFY)
        started = time.monotonic()
        with anyio.move_on_after(0.3) as scope:
            await evaluator.score(task("1"), r"\boxed{9^{9^{9^{9}}}}")
        assert scope.cancelled_caught
        assert time.monotonic() - started < 2.0  # did not wait out the 3 s deadline
        # The abandoned check still holds the only worker until its deadline kills it; the next
        # call waits for the slot, gets a fresh worker, and answers.
        assert await evaluator.equivalent(*NEEDS_MATH_VERIFY)
