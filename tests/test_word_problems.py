"""The second held-out set (evaluators/worlds/word_problems.py): shipped as generated, graded by the
real math evaluator, selectable in evaluate, refused by collect, and disjoint from everything the
training generator can produce.

Disjointness is shown by enumeration, not sampling: the training generator's text depends on its
discrete draws (``choice``, ``randrange``) and on its numbers. A scripted random source walks
every combination of the discrete draws, and a problem's *form* blanks its numbers and names, so
the forms seen are every form the generator can emit, whatever the seed. No held-out problem has
one of them, hence none of their texts can come out of the generator either (a form is a function
of the text). The question sentences alone are disjoint too.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from evaluators.math import MathEvaluator
from evaluators.worlds import math_tasks as training
from evaluators.worlds import word_problems
from exitagent import collect
from exitagent.domains import TaskSpec, get_domain
from exitagent.errors import ConfigError
from exitagent.evaluate import EvalConfig


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def held_out() -> list[str]:
    return [task.metadata["problem"] for task in training.math_tasks("wordproblems", "test")]


def test_the_shipped_file_is_what_the_generator_makes() -> None:
    shipped = training.benchmark_path("wordproblems").read_text(encoding="utf-8")
    assert shipped == "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in word_problems.generate())
    rows = [json.loads(line) for line in shipped.splitlines()]
    assert len(rows) == word_problems.COUNT == len({row["problem"] for row in rows})
    assert all(re.fullmatch(r"\d+", row["answer"]) for row in rows)  # exact, non-negative integers
    assert {row["meta"]["template"] for row in rows} == {t.__name__.lstrip("_") for t in word_problems.TEMPLATES}


def test_evaluate_selects_it_as_the_held_out_split() -> None:
    cfg = EvalConfig(out=Path("eval/x.json"), source="wordproblems")  # evaluate's default split: heldout
    tasks = get_domain("math").load_tasks(cfg.task_spec())
    assert len(tasks) == word_problems.COUNT
    assert tasks[0].prompt == training.math_prompt(tasks[0].metadata["problem"])
    assert len(get_domain("math").load_tasks(TaskSpec("wordproblems", "heldout", n=40))) == 40


@pytest.mark.anyio
async def test_the_real_grader_scores_every_gold_one_and_a_wrong_answer_zero() -> None:
    tasks = training.math_tasks("wordproblems", "test")
    with MathEvaluator(workers=1, timeout_s=20.0) as evaluator:
        for task in tasks:
            right = await evaluator.score(task, f"Step by step, the total is {task.answer}.\n\\boxed{{{task.answer}}}")
            wrong = await evaluator.score(task, f"\\boxed{{{int(task.answer) + 1}}}")
            assert (right.total, wrong.total) == (1.0, 0.0), task.id


def test_collect_refuses_it_by_name_and_by_content(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for split in ("train", "test"):
        cfg = collect.CollectConfig(run_dir=tmp_path, task_source="wordproblems", task_split=split)
        with pytest.raises(ConfigError, match="held-out set and are never trained on"):
            collect.load_tasks(cfg)
    copy = tmp_path / "renamed.jsonl"  # the same problems under another name
    copy.write_text(training.benchmark_path("wordproblems").read_text(encoding="utf-8"))
    with pytest.raises(ConfigError, match="never trained on"):
        collect.load_tasks(collect.CollectConfig(run_dir=tmp_path, task_source=str(copy)))
    # --log-level error: main configures logging for the process, and other tests' stderr counts lines too
    assert collect.main(["--run-dir", str(tmp_path / "run"), "--source", "wordproblems", "--log-level", "error"]) == 2
    assert capsys.readouterr().err.count("\n") == 1  # one clear line, no traceback
    assert len(collect.load_tasks(collect.CollectConfig(run_dir=tmp_path, num_tasks=30))) == 30  # training still works


# --- disjoint from the training generator ---------------------------------------------------------


class Scripted(random.Random):
    """Makes the generator's discrete draws from ``script`` (then the first option), its numbers at
    ``low`` or ``high`` end; records how many options each draw had."""

    def __init__(self, script: Sequence[int], high: bool) -> None:
        super().__init__(0)
        self.script, self.high = list(script), high
        self.arity: list[int] = []

    def _pick(self, options: int) -> int:
        index = len(self.arity)
        self.arity.append(options)
        return self.script[index] if index < len(self.script) else 0

    def choice(self, seq):  # type: ignore[no-untyped-def,override]
        return seq[self._pick(len(seq))]

    def randrange(self, start, stop=None, step=1):  # type: ignore[no-untyped-def,override]
        assert stop is None and step == 1, "the enumeration covers randrange(n) only"
        return self._pick(start)

    def randint(self, a: int, b: int) -> int:
        return b if self.high else a


def every_output(generate: Callable[[random.Random], tuple[str, int]]) -> Iterator[str]:
    """Each text ``generate`` makes on every path through its discrete draws (an odometer over them)."""
    for high in (False, True):
        script: list[int] = []
        while True:
            rng = Scripted(script, high)
            yield generate(rng)[0]
            picks = [rng.script[i] if i < len(rng.script) else 0 for i in range(len(rng.arity))]
            while picks and picks[-1] + 1 >= rng.arity[len(picks) - 1]:
                picks.pop()
            if not picks:
                break
            picks[-1] += 1
            script = picks


_BLANKS = [(re.compile(r"\b(" + "|".join(names) + r")\b"), "<name>")
           for names in (training._NAMES, word_problems.NAMES)] + \
          [(re.compile(r"\b(" + "|".join(training._ITEMS) + r")\b"), "<item>"), (re.compile(r"\d+"), "#")]


def form(problem: str) -> str:
    """A problem with its numbers, names and the training generator's objects blanked, lower case."""
    for pattern, blank in _BLANKS:
        problem = pattern.sub(blank, problem)
    return " ".join(problem.lower().split())


def question(problem: str) -> str:
    return form(problem).rsplit(". ", 1)[-1]


def training_forms() -> set[str]:
    return {form(text) for level in training.ARITHMETIC_LEVELS
            for text in every_output(lambda rng, level=level: training.arithmetic_problem(level, rng))}


def test_the_enumeration_covers_what_the_training_generator_draws() -> None:
    forms = training_forms()
    assert len(forms) == 3 + 4  # "what is # op #?" for +, -, *, and the four word templates: not vacuous
    drawn = training.arithmetic_tasks("train", 2000, seed=7) + training.arithmetic_tasks("heldout", 300, seed=7)
    assert {form(task.metadata["problem"]) for task in drawn} <= forms


def test_no_word_problem_can_come_out_of_the_training_generator() -> None:
    forms, problems = training_forms(), held_out()
    assert not {form(p) for p in problems} & forms
    assert not {question(p) for p in problems} & {question(f) for f in forms}
    assert not set(problems) & {task.metadata["problem"] for task in training.arithmetic_tasks("train", 5000)}
