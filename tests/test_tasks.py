"""Math task sources: shipped benchmarks, JSONL files, the arithmetic generator, and math_tasks."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from evaluators.worlds.math_tasks import (
    ARITHMETIC_LEVELS,
    BOXED_INSTRUCTION,
    MATH_BENCHMARKS,
    arithmetic_split_of,
    arithmetic_tasks,
    benchmark_path,
    load_jsonl,
    math_prompt,
    math_tasks,
)
from exitagent.errors import ConfigError

EXPECTED = {  # rows and sha256, as listed in exitagent/data/math/SOURCES.md
    "math500": (500, "2c14cbbc8b5aa95369240ca718b721bb8bc90d4bc0a138a86c39c6ab0afd4b8e"),
    "aime24": (30, "574d51305fe7cb9f5821cb2a8347946ee1a6c2e9ab775b102bb8aeb15a7485a4"),
    "olympiadbench": (675, "805421ba5007446ea23b388673d022b7f96406b5d4739a4f43c724b988029626"),
    "gsm8k_test": (1319, "095c4043af3d16f217cc12cdc15c3c97eedad92214329da51419b46391903b60"),
    "wordproblems": (300, "2f9cb62fc23a791536b0de83205131d9164a6d7f58d0721c9f458afc73d6588c"),
    "gsm8k_train": (7473, "5b609a7d3ae5083904f824a7c1496657b06ba9acf683a66898456d442532851d"),
}


# --- shipped benchmarks -----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MATH_BENCHMARKS))
def test_shipped_benchmark_is_intact_and_loads(name: str) -> None:
    rows, sha256 = EXPECTED[name]
    assert hashlib.sha256(benchmark_path(name).read_bytes()).hexdigest() == sha256
    tasks = math_tasks(name, MATH_BENCHMARKS[name])
    assert len(tasks) == rows
    assert len({task.id for task in tasks}) == rows
    first = tasks[0]
    assert first.domain == "math"
    assert first.prompt == math_prompt(first.metadata["problem"])
    assert first.prompt.endswith(BOXED_INSTRUCTION)
    assert isinstance(first.answer, str) and first.answer
    assert first.metadata["benchmark"] == name
    assert "solution" not in first.metadata


def test_package_data_is_read_from_the_installed_package() -> None:
    import exitagent

    path = Path(str(benchmark_path("math500")))
    assert path.parent == Path(exitagent.__file__).parent / "data" / "math"
    assert (path.parent / "SOURCES.md").is_file()


def test_gsm8k_alias_and_split_checks() -> None:
    assert [t.id for t in math_tasks("gsm8k", "test", n=3)] == [t.id for t in math_tasks("gsm8k_test", "test", n=3)]
    with pytest.raises(ConfigError, match="only the 'test' split"):
        math_tasks("math500", "train")
    with pytest.raises(ConfigError, match="unknown math source"):
        math_tasks("math5000", "test")
    with pytest.raises(ConfigError, match="levels apply"):
        math_tasks("math500", "test", levels=("add1",))


def test_subsets_are_seeded_and_keep_file_order() -> None:
    everything = [task.id for task in math_tasks("math500", "test")]
    subset = [task.id for task in math_tasks("math500", "test", n=50, seed=3)]
    assert subset == [task.id for task in math_tasks("math500", "test", n=50, seed=3)]
    assert subset != [task.id for task in math_tasks("math500", "test", n=50, seed=4)]
    assert subset == sorted(subset, key=everything.index)
    with pytest.raises(ConfigError, match="asked for 31"):
        math_tasks("aime24", "test", n=31)


# --- any JSONL file ---------------------------------------------------------------------------


def test_load_jsonl_reads_ids_problems_answers(tmp_path: Path) -> None:
    path = tmp_path / "mine.jsonl"
    rows = [{"id": "a", "problem": "1+1?", "answer": "2"}, {"id": 7, "problem": "2*3?", "answer": 6, "level": 2}]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n", encoding="utf-8")
    tasks = math_tasks(str(path), "test")
    assert [(t.id, t.answer, t.metadata["problem"]) for t in tasks] == [("a", "2", "1+1?"), ("7", "6", "2*3?")]
    assert tasks[1].metadata["level"] == 2
    assert tasks[0].metadata["benchmark"] == "mine"


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"id": "x", "problem": "p"}', "missing field.*answer"),
        ('{"id": "x", "problem": "", "answer": "1"}', "'problem' must be a non-empty string"),
        ('{"id": "x", "problem": "p", "answer": ""}', "'answer' is empty"),
        ('{"id": null, "problem": "p", "answer": "1"}', "'id' must be a string or a number"),
        ('{"id": "a", "problem": "p", "answer": "1"}', "duplicate id 'a' \\(first on line 1\\)"),
    ],
)
def test_load_jsonl_names_the_bad_line(tmp_path: Path, bad_line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "a", "problem": "p", "answer": "1"}\n\n' + bad_line + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=f"bad.jsonl:3: {message}"):
        load_jsonl(path)


# --- the arithmetic generator -----------------------------------------------------------------

_EXPRESSION = re.compile(r"What is (\d+) ([-+*]) (\d+)\?")


def solve(problem: str) -> int:
    """An independent solver for the generated phrasings."""
    expression = _EXPRESSION.fullmatch(problem)
    if expression:
        a, op, b = int(expression.group(1)), expression.group(2), int(expression.group(3))
        return {"+": a + b, "-": a - b, "*": a * b}[op]
    a, b = (int(number) for number in re.findall(r"\d+", problem))
    if "gives away" in problem:
        return a - b
    if "in each bag" in problem:
        return a * b
    return a + b


def test_arithmetic_answers_are_correct_and_prompts_short() -> None:
    for split in ("train", "heldout"):
        for task in arithmetic_tasks(split, 1000, seed=1):
            assert task.answer == str(solve(task.metadata["problem"]))
            assert int(task.answer) >= 0
            assert task.prompt == math_prompt(task.metadata["problem"])
            assert len(task.metadata["problem"]) < 120


def test_arithmetic_is_deterministic_per_seed_and_split() -> None:
    first = arithmetic_tasks("train", 200, seed=5)
    assert first == arithmetic_tasks("train", 200, seed=5)
    assert [t.id for t in first] != [t.id for t in arithmetic_tasks("train", 200, seed=6)]
    assert len({t.id for t in first}) == 200  # distinct problems within a call


@pytest.mark.parametrize("level", ARITHMETIC_LEVELS)
def test_levels_have_the_promised_operands(level: str) -> None:
    for task in arithmetic_tasks("train", 15, seed=0, levels=[level]):
        problem = task.metadata["problem"]
        assert task.metadata["level"] == level
        expression = _EXPRESSION.fullmatch(problem)
        if level == "word":
            assert expression is None and "How many" in problem
            continue
        assert expression is not None
        assert expression.group(2) == {"add": "+", "sub": "-", "mul": "*"}[level[:3]]
        digits = int(level[3])
        assert all(len(expression.group(i)) == digits for i in (1, 3))


def test_train_and_heldout_never_share_a_problem() -> None:
    train = {t.metadata["problem"] for seed in range(5) for t in arithmetic_tasks("train", 3000, seed=seed)}
    heldout = {t.metadata["problem"] for seed in range(5) for t in arithmetic_tasks("heldout", 1000, seed=seed)}
    assert train.isdisjoint(heldout)
    assert all(arithmetic_split_of(problem) == "train" for problem in train)
    assert all(arithmetic_split_of(problem) == "heldout" for problem in heldout)
    # Even the smallest level has problems on both sides, and they differ.
    small_train = {t.metadata["problem"] for t in arithmetic_tasks("train", 60, levels=["add1"])}
    small_heldout = {t.metadata["problem"] for t in arithmetic_tasks("heldout", 15, levels=["add1"])}
    assert small_train.isdisjoint(small_heldout)


def test_exhausted_levels_raise_with_the_count() -> None:
    assert len(arithmetic_tasks("heldout", 10, levels=["add1"])) == 10
    with pytest.raises(ConfigError, match=r"only \d+ distinct heldout arithmetic problems"):
        arithmetic_tasks("heldout", 101, levels=["add1"])  # add1 has 100 problems in all


def test_math_tasks_arithmetic_arguments() -> None:
    assert math_tasks("arithmetic", "test", n=20, seed=2) == arithmetic_tasks("heldout", 20, seed=2)
    assert math_tasks("arithmetic", "train", n=20, levels=["mul2"]) == arithmetic_tasks("train", 20, levels=["mul2"])
    with pytest.raises(ConfigError, match="needs n"):
        math_tasks("arithmetic", "train")
    with pytest.raises(ConfigError, match="unknown or no arithmetic levels"):
        math_tasks("arithmetic", "train", n=5, levels=["div1"])
    with pytest.raises(ConfigError, match="'train' or 'heldout'"):
        math_tasks("arithmetic", "validation", n=5)
