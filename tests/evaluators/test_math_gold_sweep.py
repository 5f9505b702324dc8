"""Every gold answer of MATH-500 and GSM8K (train and test) graded against itself and rewrites.

Two sweeps: one through ``MathEvaluator.score`` (extraction, the cheap checks, math-verify where
needed), and one that forces every gold, plus AIME 2024 and OlympiadBench, through math-verify
itself so that a gold it cannot read is caught here rather than as a silent 0 in training.
About 30 s on 2 cores (shared with other work), so not marked slow.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import anyio
import pytest

from evaluators.math import MathEvaluator, math_verify_equivalent
from evaluators.worlds.math_tasks import load_benchmark
from exitagent.types import Task

SWEPT = ("math500", "gsm8k_train", "gsm8k_test")
_FRACTION = re.compile(r"(-?)\\frac\{(\d+)\}\{(\d+)\}")


def equivalent_rewrites(gold: str) -> Iterator[str]:
    """Responses whose final answer means the same as ``gold``, in the styles models write."""
    yield f"Working it out step by step.\n\\boxed{{{gold}}}"
    yield f"The answer is ${gold}$."
    if "\\frac" in gold:
        yield f"\\boxed{{{gold.replace(chr(92) + 'frac', chr(92) + 'dfrac')}}}"
    if re.fullmatch(r"-?\d+", gold):
        yield f"#### {int(gold):,}"  # thousands separators, GSM8K style
        yield f"So we get \\boxed{{{gold}.}}"
    fraction = _FRACTION.fullmatch(gold)
    if fraction:
        sign, numerator, denominator = fraction.groups()
        yield f"\\boxed{{{sign}{numerator}/{denominator}}}"


def wrong_answer(gold: str) -> str | None:
    """A response with a wrong answer, where one is easy to make for sure."""
    if re.fullmatch(r"-?\d+", gold):
        return f"\\boxed{{{int(gold) + 1}}}"
    fraction = _FRACTION.fullmatch(gold)
    if fraction and fraction.group(2) != fraction.group(3):
        sign, numerator, denominator = fraction.groups()
        return f"\\boxed{{{sign}\\frac{{{denominator}}}{{{numerator}}}}}"
    return None


@pytest.mark.anyio
async def test_every_gold_scores_one_as_itself_and_rewrites_and_zero_when_wrong(
    math_evaluator: MathEvaluator,
) -> None:
    failures: list[str] = []
    checked = 0

    async def check(task: Task, response: str, expected: float) -> None:
        nonlocal checked
        score = await math_evaluator.score(task, response)
        checked += 1
        if score.total != expected:
            failures.append(f"{task.id}: gold {task.answer!r}, response {response!r} -> {score.total}")

    async with anyio.create_task_group() as group:
        for name in SWEPT:
            for task in load_benchmark(name):
                for response in equivalent_rewrites(task.answer):
                    group.start_soon(check, task, response, 1.0)
                wrong = wrong_answer(task.answer)
                if wrong is not None:
                    group.start_soon(check, task, wrong, 0.0)
    assert not failures, f"{len(failures)} of {checked} graded wrongly:\n" + "\n".join(failures[:30])
    assert checked > 4 * 8000


@pytest.mark.anyio
async def test_math_verify_reads_every_gold_and_finds_it_equal_to_itself(math_evaluator: MathEvaluator) -> None:
    # The cheap checks settle "gold vs same gold" without sympy; go to math-verify directly.
    limiter = anyio.CapacityLimiter(4)
    failures: list[str] = []

    async def check(task: Task) -> None:
        verdict = await anyio.to_thread.run_sync(
            math_evaluator.pool.run, math_verify_equivalent, task.answer, task.answer, limiter=limiter
        )
        if verdict is not True:
            failures.append(f"{task.id}: {task.answer!r}")

    async with anyio.create_task_group() as group:
        for name in (*SWEPT, "aime24", "olympiadbench"):
            for task in load_benchmark(name):
                group.start_soon(check, task)
    assert not failures, "math-verify does not see these golds as equal to themselves:\n" + "\n".join(failures)
