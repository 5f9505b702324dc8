"""Math task sources: the shipped benchmarks, any JSONL file, and a seeded arithmetic generator.

Every source returns ``Task(domain="math", prompt=..., answer=..., metadata=...)``; ``answer`` is
the gold answer as a string, for ``evaluators.math.MathEvaluator``. ``math_tasks`` is the one
entry point the collector and the evaluation scripts call::

    math_tasks("math500", "test")                      # all 500, file order
    math_tasks("wordproblems", "test")                 # the second held-out set (word_problems.py)
    math_tasks("gsm8k", "train", n=1000, seed=0)       # a seeded subset (kept in file order)
    math_tasks("arithmetic", "train", n=5000, seed=0, levels=("add1", "add2", "word"))
    math_tasks("path/to/problems.jsonl", "test")       # one {"id", "problem", "answer"} per line

The prompt is the problem, a blank line, then ``BOXED_INSTRUCTION``. It is deliberately minimal
(no system prompt, no few-shot examples): \\boxed{} is the extractor the math evaluator prefers,
and a small model that ignores the instruction is still graded by the fallback extractors.

Arithmetic train/held-out disjointness holds by construction: a problem's split is a function
of its text (``arithmetic_split_of``, a hash), and each split's generator keeps only its own
problems, whatever the seeds. The two splits also draw from differently seeded streams.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterable, Sequence
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import structlog

from exitagent.errors import ConfigError
from exitagent.types import Task

log = structlog.get_logger(__name__)

BOXED_INSTRUCTION = "Put your final answer in \\boxed{}."
# The shipped benchmark files (exitagent/data/math/, provenance in SOURCES.md there), each with
# the one split it holds.
MATH_BENCHMARKS = {
    "math500": "test",
    "gsm8k_train": "train",
    "gsm8k_test": "test",
    "aime24": "test",
    "olympiadbench": "test",
    "wordproblems": "test",  # held out: never trained on (evaluators/worlds/word_problems.py)
}
ARITHMETIC_LEVELS = ("add1", "add2", "add3", "sub1", "sub2", "sub3", "mul1", "mul2", "mul3", "word")
HELDOUT_BUCKETS = 5  # one problem text in five belongs to the held-out split
# Row fields kept in Task.metadata. Solutions stay on disk: tasks travel through the store.
_METADATA_FIELDS = ("source", "subject", "level", "meta")


def math_prompt(problem: str) -> str:
    """The first-attempt prompt for a math problem."""
    return f"{problem}\n\n{BOXED_INSTRUCTION}"


# --- files ------------------------------------------------------------------------------------


def benchmark_path(name: str) -> Traversable:
    """Where a shipped benchmark lives inside the installed package."""
    if name not in MATH_BENCHMARKS:
        raise ConfigError(f"unknown math benchmark {name!r}; choose from {', '.join(MATH_BENCHMARKS)}")
    return files("exitagent") / "data" / "math" / f"{name}.jsonl"


def load_benchmark(name: str) -> list[Task]:
    """All tasks of a shipped benchmark (``MATH_BENCHMARKS``), in file order."""
    tasks = load_jsonl(benchmark_path(name), split=MATH_BENCHMARKS[name], benchmark=name)
    log.debug("benchmark_loaded", benchmark=name, tasks=len(tasks))
    return tasks


def load_jsonl(path: str | os.PathLike[str] | Traversable, *, split: str = "test", benchmark: str = "") -> list[Task]:
    """Tasks from a JSONL file with one ``{"id", "problem", "answer"}`` object per line.

    Blank lines are skipped. A malformed line raises ``ConfigError`` naming the file and line.
    """
    source = Path(path) if isinstance(path, str | os.PathLike) else path
    name = benchmark or Path(source.name).stem
    tasks: list[Task] = []
    seen: dict[str, int] = {}
    with source.open("r", encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            task = _task_from_line(line, where=f"{source}:{number}", split=split, benchmark=name)
            if task.id in seen:
                raise ConfigError(f"{source}:{number}: duplicate id {task.id!r} (first on line {seen[task.id]})")
            seen[task.id] = number
            tasks.append(task)
    return tasks


def _task_from_line(line: str, *, where: str, split: str, benchmark: str) -> Task:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{where}: not valid JSON ({error.msg})") from None
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [key for key in ("id", "problem", "answer") if key not in row]
    if missing:
        raise ConfigError(f"{where}: missing field(s) {', '.join(missing)}")
    for key in ("id", "answer"):  # numbers are fine here: a gold answer of 42 means "42"
        if not isinstance(row[key], str | int | float) or isinstance(row[key], bool):
            raise ConfigError(f"{where}: {key!r} must be a string or a number")
    if not isinstance(row["problem"], str) or not row["problem"].strip():
        raise ConfigError(f"{where}: 'problem' must be a non-empty string")
    if not str(row["answer"]).strip():
        raise ConfigError(f"{where}: 'answer' is empty")
    metadata: dict[str, Any] = {"benchmark": benchmark, "split": split, "problem": row["problem"]}
    metadata.update({key: row[key] for key in _METADATA_FIELDS if key in row})
    return Task(
        id=str(row["id"]),
        domain="math",
        prompt=math_prompt(row["problem"]),
        answer=str(row["answer"]),
        metadata=metadata,
    )


# --- the arithmetic generator -----------------------------------------------------------------

_DIGIT_RANGES = {"1": (0, 9), "2": (10, 99), "3": (100, 999)}
_SYMBOLS = {"add": "+", "sub": "-", "mul": "*"}
_NAMES = ("Ann", "Ben", "Cara", "Dev", "Eva", "Finn", "Gus", "Hana", "Ivan", "Jo")
_ITEMS = ("apples", "books", "cards", "coins", "eggs", "pens", "shells", "stamps", "stickers", "toys")


def arithmetic_split_of(problem: str) -> str:
    """The split a problem text belongs to: ``"heldout"`` for one hash bucket of five, else ``"train"``."""
    bucket = int.from_bytes(hashlib.sha256(problem.encode()).digest()[:8], "big") % HELDOUT_BUCKETS
    return "heldout" if bucket == 0 else "train"


def _word_problem(rng: random.Random) -> tuple[str, int]:
    name, items = rng.choice(_NAMES), rng.choice(_ITEMS)
    kind = rng.randrange(4)
    if kind == 3:  # keep products small: this level is about reading, not long multiplication
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return f"{name} buys {a} bags with {b} {items} in each bag. How many {items} does {name} buy?", a * b
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    if kind == 0:
        return f"{name} has {a} {items} and gets {b} more. How many {items} does {name} have now?", a + b
    if kind == 1:
        a, b = max(a, b), min(a, b)
        return f"{name} has {a} {items} and gives away {b}. How many {items} does {name} have left?", a - b
    return f"There are {a} {items} in a box and {b} on the table. How many {items} are there in all?", a + b


def arithmetic_problem(level: str, rng: random.Random) -> tuple[str, int]:
    """One problem of ``level`` and its answer. Differences are never negative."""
    if level == "word":
        return _word_problem(rng)
    operation, digits = level[:3], level[3:]
    low, high = _DIGIT_RANGES[digits]
    a, b = rng.randint(low, high), rng.randint(low, high)
    if operation == "sub" and a < b:
        a, b = b, a
    answer = {"add": a + b, "sub": a - b, "mul": a * b}[operation]
    return f"What is {a} {_SYMBOLS[operation]} {b}?", answer


def _check_levels(levels: Iterable[str]) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(levels))  # dedupe, keep order
    unknown = [level for level in chosen if level not in ARITHMETIC_LEVELS]
    if unknown or not chosen:
        raise ConfigError(f"unknown or no arithmetic levels {unknown}; choose from {', '.join(ARITHMETIC_LEVELS)}")
    return chosen


def arithmetic_tasks(split: str, n: int, seed: int = 0, levels: Sequence[str] = ARITHMETIC_LEVELS) -> list[Task]:
    """``n`` distinct arithmetic tasks of ``split`` (``"train"`` or ``"heldout"``), levels drawn uniformly.

    Deterministic per ``(split, seed, levels)``. A level whose problems of this split run out
    (``add1`` has about 20 held-out problems) drops out of the draw; if every level runs out
    before ``n``, ``ConfigError``.
    """
    if split not in ("train", "heldout"):
        raise ConfigError(f"arithmetic split must be 'train' or 'heldout', not {split!r}")
    active = list(_check_levels(levels))
    rng = random.Random(f"exitagent-arithmetic:{split}:{seed}")  # str seeds hash the same in every run
    seen: set[str] = set()
    repeats = dict.fromkeys(active, 0)  # consecutive repeats per level: a run of 1000 means exhausted
    tasks: list[Task] = []
    while len(tasks) < n:
        if not active:
            raise ConfigError(f"only {len(tasks)} distinct {split} arithmetic problems at levels {list(levels)}")
        level = rng.choice(active)
        problem, answer = arithmetic_problem(level, rng)
        if arithmetic_split_of(problem) != split:
            continue
        if problem in seen:
            repeats[level] += 1
            if repeats[level] >= 1000:
                active.remove(level)
            continue
        repeats[level] = 0
        seen.add(problem)
        digest = hashlib.sha256(problem.encode()).hexdigest()[:12]
        metadata = {"benchmark": "arithmetic", "split": split, "level": level, "problem": problem}
        tasks.append(Task(f"arith-{level}-{digest}", "math", math_prompt(problem), str(answer), metadata))
    return tasks


# --- one entry point --------------------------------------------------------------------------


def math_tasks(
    source: str, split: str, n: int | None = None, seed: int = 0, levels: Sequence[str] | None = None
) -> list[Task]:
    """Tasks from ``source``: a benchmark name, ``"gsm8k"``, ``"arithmetic"``, or a ``.jsonl`` path.

    ``split``: a benchmark's own split (``"test"``; ``"train"`` for ``gsm8k_train``), ``"train"``/
    ``"test"`` for ``"gsm8k"``, ``"train"``/``"heldout"`` (``"test"`` means ``"heldout"``) for
    ``"arithmetic"``, and any label for a file. ``n`` picks a seeded subset of a file (in file
    order; all when None) and is required for ``"arithmetic"``. ``levels`` is for arithmetic only.
    """
    if levels is not None and source != "arithmetic":
        raise ConfigError(f"levels apply to the arithmetic source only, not {source!r}")
    if source == "arithmetic":
        if n is None:
            raise ConfigError("the arithmetic source needs n, the number of tasks to generate")
        split = "heldout" if split == "test" else split
        return arithmetic_tasks(split, n, seed, ARITHMETIC_LEVELS if levels is None else levels)
    if source == "gsm8k":
        source = f"gsm8k_{split}"
    if source in MATH_BENCHMARKS:
        if split != MATH_BENCHMARKS[source]:
            raise ConfigError(f"benchmark {source!r} has only the {MATH_BENCHMARKS[source]!r} split, not {split!r}")
        tasks = load_benchmark(source)
    elif source.endswith(".jsonl"):
        tasks = load_jsonl(source, split=split)
    else:
        names = ", ".join([*MATH_BENCHMARKS, "gsm8k", "arithmetic"])
        raise ConfigError(f"unknown math source {source!r}; choose from {names} or a .jsonl path")
    return _subset(tasks, n, seed, source)


def _subset(tasks: list[Task], n: int | None, seed: int, source: str) -> list[Task]:
    if n is None:
        return tasks
    if not 0 <= n <= len(tasks):
        raise ConfigError(f"asked for {n} tasks but {source!r} has {len(tasks)}")
    keep = sorted(random.Random(f"exitagent-subset:{source}:{seed}").sample(range(len(tasks)), n))
    return [tasks[i] for i in keep]
