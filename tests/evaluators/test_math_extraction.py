"""Answer extraction and the cheap checks: pure functions, no worker processes."""

from __future__ import annotations

import time
from decimal import Decimal

import pytest

from evaluators.math import EXTRACTORS, Extraction, as_plain_number, clean_answer, extract_answer, quick_verdict


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (r"First \boxed{3}, then corrected: \boxed{\frac{1}{2}}", Extraction("boxed", r"\frac{1}{2}")),
        (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", Extraction("boxed", r"\left( 3, \frac{\pi}{2} \right)")),
        (r"\boxed {x^{2}}", Extraction("boxed", "x^{2}")),
        (r"\fbox{7}", Extraction("boxed", "7")),
        (r"\boxed{\{1, 2\}}", Extraction("boxed", r"\{1, 2\}")),
        (r"So $\boxed{5.}$", Extraction("boxed", "5")),
        (r"\boxed{12} and then a box cut off: \boxed{\frac{1}{", Extraction("boxed", "12")),
        ("She pays 3 * 6 = <<3*6=18>>18 dollars.\n#### 1,800", Extraction("hash", "1,800")),
        ("The answer is $\\frac{1}{2}$.", Extraction("answer_is", r"\frac{1}{2}")),
        ("The answer is 3.5. Let me double check: 7/2 = 3.5.", Extraction("answer_is", "3.5")),
        ("**Final Answer:** 42", Extraction("answer_is", "42")),
        ("answer: \\$18", Extraction("answer_is", "\\$18")),
        ("2 + 3 = 5, so 5 + 1,000 = 1,005 apples.", Extraction("last_number", "1,005")),
        ("The temperature fell to -3.", Extraction("last_number", "-3")),
        ("It is .5", Extraction("last_number", ".5")),
        ("Read pages 10-12", Extraction("last_number", "12")),
        ("f(2)-3 is it", Extraction("last_number", "3")),
        ("The answer isn't obvious; try 6", Extraction("last_number", "6")),
    ],
)
def test_extractors(response: str, expected: Extraction) -> None:
    assert extract_answer(response) == expected


def test_preference_order_is_boxed_hash_answer_is_last_number() -> None:
    assert EXTRACTORS == ("boxed", "hash", "answer_is", "last_number")
    everything = "The answer is 1.\n#### 2\n\\boxed{3} and finally 4"
    assert extract_answer(everything) == Extraction("boxed", "3")
    assert extract_answer("The answer is 1.\n#### 2\nthen 4") == Extraction("hash", "2")
    assert extract_answer("The answer is 1. Not 4") == Extraction("answer_is", "1")


@pytest.mark.parametrize("response", ["", "I don't know.", r"\boxed{}", "The answer is .", "#### "])
def test_no_answer_found(response: str) -> None:
    assert extract_answer(response) is None


@pytest.mark.parametrize(
    ("raw", "cleaned"),
    [(" $5$ ", "5"), (r"\(x+1\)", "x+1"), (r"\[\frac{1}{2}\]", r"\frac{1}{2}"), ("**42**.", "42"), ("1,000.", "1,000")],
)
def test_clean_answer(raw: str, cleaned: str) -> None:
    assert clean_answer(raw) == cleaned


@pytest.mark.parametrize(
    ("text", "number"),
    [("1,000", Decimal(1000)), ("-0.5", Decimal("-0.5")), (".25", Decimal("0.25")), ("\\$18", Decimal(18))],
)
def test_plain_numbers(text: str, number: Decimal) -> None:
    assert as_plain_number(text) == number


@pytest.mark.parametrize("text", ["1,2", "12,34", "x", "1/2", r"\frac{1}{2}", "-", ".", "1e5", "3, 5"])
def test_not_plain_numbers(text: str) -> None:
    assert as_plain_number(text) is None


@pytest.mark.parametrize(
    ("gold", "answer", "verdict"),
    [
        (r"\frac{1}{2}", r"\frac {1}{2}", True),  # same text up to spaces
        ("1000", "1,000", True),
        ("0.5", ".50", True),
        ("5", "5.0", True),
        ("5", "6", False),
        ("-7", "7", False),
        ("0.5", "0.4", None),  # unequal decimals: math-verify's rounding decides
        (r"\frac{1}{2}", "0.5", None),
        ("18", "18 dollars", None),
    ],
)
def test_quick_verdict(gold: str, answer: str, verdict: bool | None) -> None:
    assert quick_verdict(gold, answer) is verdict


def test_many_unclosed_boxes_are_read_in_linear_time() -> None:
    began = time.monotonic()
    assert extract_answer("\\boxed{" * 5000) is None  # took 17 s before: each box rescanned to the end
    assert extract_answer("\\boxed{7} then " + "\\boxed{" * 5000) == Extraction("boxed", "7")
    assert time.monotonic() - began < 2
