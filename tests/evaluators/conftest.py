"""Fixtures for the evaluator tests: the anyio backend, and one warm math evaluator per module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from evaluators.math import MathEvaluator


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def math_evaluator() -> Iterator[MathEvaluator]:
    # Module-scoped because starting a worker (importing sympy and math-verify) takes a second or
    # two; the pool is thread-based, so it serves each test's fresh event loop alike.
    with MathEvaluator(workers=2, timeout_s=20.0) as evaluator:
        yield evaluator
