"""The MLE prompt (exit-spec.md section 3) and how a program and its error trace live in the buffer.

One template for every step: a goal line (improve, debug or diverge), the current ``solution.py``
(for a debug step, its error output right under the code), the task description, previews of the
public data files, and the rules. Base tasks improve ``TEMPLATE_PROGRAM``, an empty program.

A buffer entry's iterate is the program, followed (when its run crashed) by ``TRACE_MARK`` and the
error output: the store keeps one text per entry, and a later debug step needs both. The mark is a
comment line, so the iterate still reads as a Python file.
"""

from __future__ import annotations

import csv
import functools
from pathlib import Path

from exitagent.types import StepKind

DATA_ENV = "DATA_DIR"

TEMPLATE_PROGRAM = f'''import os

import pandas as pd

DATA_DIR = os.environ["{DATA_ENV}"]

# TODO: read train.csv and test.csv from DATA_DIR, fit a model on train.csv,
# and write a prediction for every row of test.csv to submission.csv.
'''

GOALS = {
    StepKind.IMPROVE: "Improve the current solution.py below so that its submission scores better.",
    StepKind.DEBUG: "The current solution.py below crashed; its error output is shown under the code. Fix it so "
                    "that it runs and writes a valid submission.",
    StepKind.DIVERGE: "Write a new solution.py whose approach is RADICALLY DIFFERENT from the current one (another "
                      "kind of model, other features or preprocessing), aiming for a better score.",
}

TRACE_MARK = "# ---- error output of the last run of the program above ----"
PREVIEW_FILES = ("train.csv", "test.csv", "sample_submission.csv")
PREVIEW_LINE_CHARS = 160


def goal_kind(kind: StepKind) -> StepKind:
    """Base tasks and replays improve the template program; the other kinds are their own goal."""
    return kind if kind in GOALS else StepKind.IMPROVE


def encode_iterate(program: str, trace: str = "") -> str:
    """A buffer iterate: the program, and under ``TRACE_MARK`` the error output of a crashed run."""
    return f"{program.rstrip()}\n\n{TRACE_MARK}\n{trace.strip()}\n" if trace else program


def decode_iterate(text: str) -> tuple[str, str]:
    """(program, error output) of a buffer iterate; the output is "" for a program that ran."""
    program, mark, trace = text.partition(f"\n{TRACE_MARK}\n")
    return (program.rstrip() + "\n", trace.strip()) if mark else (text, "")


def clip_trace(trace: str, limit: int) -> str:
    """The tail of the error output (a traceback ends with its cause), with the first line kept."""
    if len(trace) <= limit:
        return trace
    first, _, rest = trace.partition("\n")
    return f"{first}\n[... earlier output cut ...]\n{rest[-max(limit - len(first), 0):]}"


def _clip_line(line: str) -> str:
    return line if len(line) <= PREVIEW_LINE_CHARS else line[:PREVIEW_LINE_CHARS] + " ..."


@functools.cache
def _file_preview(path: Path, rows: int, mtime_ns: int) -> str:
    del mtime_ns  # part of the cache key only: a re-prepared file is read again
    with path.open(newline="", encoding="utf-8") as file:
        reader = csv.reader(file)
        header = next(reader, [])
        head, count = [], 0
        for row in reader:
            if count < rows:
                head.append(",".join(row))
            count += 1
    lines = [_clip_line(",".join(header)), *(_clip_line(line) for line in head)]
    body = "\n".join(lines)
    return f"### {path.name}: {count} rows, {len(header)} columns\n```\n{body}\n```"


def data_preview(public_dir: Path, rows: int) -> str:
    """Header and the first ``rows`` rows of each public file (long lines cut)."""
    parts = []
    for name in PREVIEW_FILES:
        path = public_dir / name
        if path.is_file():
            parts.append(_file_preview(path, rows, path.stat().st_mtime_ns))
    others = sorted(p.name for p in public_dir.iterdir() if p.name not in PREVIEW_FILES) if public_dir.is_dir() else []
    if others:
        parts.append("Other files: " + ", ".join(others[:20]) + (" ..." if len(others) > 20 else ""))
    return "\n\n".join(parts)


def step_prompt(kind: StepKind, program: str, trace: str, description: str, preview: str, *,
                time_limit_s: float, memory_mb: int) -> str:
    """The user message of one MLE step (the only message: MLE is single-turn)."""
    goal = goal_kind(kind)
    parts = [
        "You are an expert machine-learning engineer taking part in a Kaggle-style competition.",
        f"Goal: {GOALS[goal]}",
        f"# Current solution.py\n```python\n{program.rstrip()}\n```",
    ]
    if goal is StepKind.DEBUG and trace:
        parts.append(f"# Error output of the current solution.py\n```\n{trace.strip()}\n```")
    parts += [
        f"# Task description\n{description.strip()}",
        f"# Data\nThe directory named by the environment variable {DATA_ENV} holds these files (read-only):\n\n"
        f"{preview}",
        "# Rules\n"
        f"- Read the data from the directory in os.environ[\"{DATA_ENV}\"].\n"
        "- Write submission.csv in the current working directory, with the columns of sample_submission.csv "
        "and one row per row of test.csv.\n"
        "- Create no other files. There is no internet access. Python 3 with numpy, pandas and scikit-learn "
        f"is available; the program gets one CPU core, {time_limit_s:g} seconds and {memory_mb} MiB of memory.\n"
        "- Answer with the whole new solution.py in one ```python fenced code block.",
    ]
    return "\n\n".join(parts)
