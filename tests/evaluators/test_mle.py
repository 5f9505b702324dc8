"""The MLE evaluator on the real bubblewrap sandbox: private answers out of reach, crashes and time
outs scored 0 with their trace, invalid submissions scored 0 with a reason, runs bounded in number
and leaving nothing behind. Time limits are small so the suite stays fast."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import anyio
import pytest

from evaluators.mle import MLEEvaluator, extract_program
from evaluators.worlds.mle import Competition
from evaluators.worlds.mle.references import baseline_program, strong_program
from exitagent.domains.mle import task_for
from exitagent.errors import EvaluatorError
from exitagent.types import Score, Task
from tests.sandboxing import needs_bwrap

pytestmark = needs_bwrap


def _fenced(program: str) -> str:
    return f"Plan: a simple model.\n\n```python\n{program}\n```\n"


HEAD = """import os
import pandas as pd
data = os.environ["DATA_DIR"]
test = pd.read_csv(os.path.join(data, "test.csv"))
"""


def test_extract_program() -> None:
    assert extract_program("no code here") is None
    assert extract_program("```python\n\n```") is None
    assert extract_program("text\n```python\nprint(1)\n```\nmore") == "print(1)\n"
    assert extract_program("```\nprint(2)\n```") == "print(2)\n"
    # a python block wins over a bare one before it; the first python block is the program
    assert extract_program("```\nls -l\n```\n```py\nprint(3)\n```\n```python\nprint(4)\n```") == "print(3)\n"
    # an answer cut off before its closing fence still yields its code
    assert extract_program("```python\nimport os\nx = (") == "import os\nx = (\n"
    assert extract_program("```bash\necho hi\n```") is None


@pytest.mark.anyio
async def test_reference_programs_normalise(iris: Competition) -> None:
    async with MLEEvaluator(time_limit_s=30) as evaluator:
        strong = await evaluator.score(task_for(iris), _fenced(strong_program(iris.id)))
        weak = await evaluator.score(task_for(iris), _fenced(baseline_program(iris.id)))
    assert strong.total == pytest.approx(1.0) and strong.components["errored"] == 0.0
    assert weak.total == pytest.approx(0.0) and weak.components["valid_submission"] == 1.0
    assert "accuracy" in strong.detail


@pytest.mark.anyio
async def test_private_answers_are_not_reachable(iris: Competition) -> None:
    """The program looks for the answers next to the public data, at their host path, and everywhere
    it can write or read under its workspace and /tmp: it finds nothing, and says so by crashing."""
    program = f"""import os
data = os.environ["DATA_DIR"]
candidates = [os.path.join(data, "..", "private", "answers.csv"), {str(iris.answers_path)!r},
              os.path.join(data, "..", "..", "private", "answers.csv")]
for top in ("/workspace", "/tmp", os.path.dirname(data)):
    for folder, _, files in os.walk(top):
        candidates += [os.path.join(folder, f) for f in files if f == "answers.csv"]
found = [p for p in candidates if os.path.exists(p)]
print("private dir visible:", os.path.exists({str(iris.private_dir)!r}))
open(candidates[0]).read()
"""
    async with MLEEvaluator(time_limit_s=20) as evaluator:
        score = await evaluator.score_program(iris, program)
    assert score.total == 0.0 and score.components["errored"] == 1.0
    assert "FileNotFoundError" in score.detail and "private/answers.csv" in score.detail
    assert iris.answers_path.is_file()  # it is there on the host, just not in the sandbox


@pytest.mark.anyio
async def test_crash_scores_zero_with_its_trace(iris: Competition) -> None:
    program = HEAD + "def fit(frame):\n    raise RuntimeError('boom 42: the model diverged')\nfit(test)\n"
    async with MLEEvaluator(time_limit_s=20) as evaluator:
        score = await evaluator.score(task_for(iris), _fenced(program))
    assert score.total == 0.0
    assert score.components["errored"] == 1.0 and score.components["timed_out"] == 0.0
    assert "exited with code 1" in score.detail
    assert "Traceback" in score.detail and "RuntimeError: boom 42: the model diverged" in score.detail
    assert 'line 6, in fit' in score.detail


@pytest.mark.anyio
async def test_time_limit_kills_and_scores_zero(iris: Competition) -> None:
    program = HEAD + "test[['id']].assign(species='setosa').to_csv('submission.csv', index=False)\nwhile True:\n" \
                     "    pass\n"
    started = time.monotonic()
    async with MLEEvaluator(time_limit_s=3) as evaluator:
        score = await evaluator.score_program(iris, program)
    assert time.monotonic() - started < 15
    assert score.total == 0.0  # even though a valid submission was written before the loop
    assert score.components["timed_out"] == 1.0 and score.components["errored"] == 1.0
    assert "time limit of 3 s" in score.detail


@pytest.mark.anyio
@pytest.mark.parametrize(("body", "reason"), [
    ("test[['id']].assign(prediction='setosa')", "expected the columns"),
    ("test[['id']].assign(species='setosa').iloc[:-2]", "rows"),
    ("test[['id']].assign(species=[None] + ['setosa'] * (len(test) - 1))", "missing predictions"),
])
async def test_invalid_submissions_score_zero_with_a_reason(iris: Competition, body: str, reason: str) -> None:
    program = HEAD + f"{body}.to_csv('submission.csv', index=False)\n"
    async with MLEEvaluator(time_limit_s=20) as evaluator:
        score = await evaluator.score_program(iris, program)
    assert score.total == 0.0
    assert score.components["errored"] == 0.0 and score.components["valid_submission"] == 0.0
    assert score.detail.startswith("invalid submission:") and reason in score.detail


@pytest.mark.anyio
async def test_missing_submission_and_format_failure(iris: Competition) -> None:
    async with MLEEvaluator(time_limit_s=20) as evaluator:
        missing = await evaluator.score_program(iris, "print('I forgot to write the file')\n")
        unformatted = await evaluator.score(task_for(iris), "I would train a random forest.")
    assert missing.total == 0.0 and "wrote no submission.csv" in missing.detail
    assert unformatted.total == 0.0 and unformatted.components["format_error"] == 1.0
    assert "no fenced" in unformatted.detail


@pytest.mark.anyio
async def test_runs_are_bounded_and_leave_nothing(iris: Competition, tmp_path: Path) -> None:
    """Two slots: four programs of ~1.5 s take at least two rounds. Each starts a daemon in a new
    session and writes files; afterwards no such process and no sandbox directory is left."""
    marker = uuid.uuid4().hex
    program = HEAD + f"""import subprocess, time
subprocess.Popen(["sh", "-c", "exec -a {marker} sleep 300"], start_new_session=True)
open("scratch.bin", "wb").write(b"x" * 1000)
open("/tmp/scratch.bin", "wb").write(b"x" * 1000)
time.sleep(1.5)
test[['id']].assign(species='setosa').to_csv('submission.csv', index=False)
"""
    evaluator = MLEEvaluator(time_limit_s=20, workers=2, base_dir=tmp_path)
    scores: list[Score] = []
    started = time.monotonic()
    async with evaluator, anyio.create_task_group() as group:
        for _ in range(4):
            group.start_soon(lambda: _collect(evaluator, iris, program, scores))
    elapsed = time.monotonic() - started
    assert len(scores) == 4 and all(s.components["valid_submission"] == 1.0 for s in scores)
    assert elapsed >= 3.0  # two at a time
    assert os.listdir(tmp_path) == []  # every sandbox directory removed
    assert not _processes_with(marker)


async def _collect(evaluator: MLEEvaluator, competition: Competition, program: str, into: list[Score]) -> None:
    into.append(await evaluator.score_program(competition, program))


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                continue
    return found


@pytest.mark.anyio
async def test_infrastructure_failures_raise(iris: Competition) -> None:
    async with MLEEvaluator(time_limit_s=5) as evaluator:
        with pytest.raises(EvaluatorError, match="no competition_dir"):
            await evaluator.score(Task("x", "mle", "prompt"), _fenced("print(1)"))
        gone = Task("gone", "mle", "", metadata={"competition_dir": "/nonexistent/competition"})
        with pytest.raises(EvaluatorError, match="not a prepared competition"):
            await evaluator.score(gone, _fenced("print(1)"))


@pytest.mark.anyio
@pytest.mark.parametrize(("writer", "reason"), [
    # a 3,000,000-column header (about 24 MB): pandas makes an object per column
    ("f.write(','.join(f'c{i}' for i in range(3_000_000)) + '\\n')", "MiB of memory to grade"),
    # one 60 MB field in an otherwise well-formed file
    ("f.write('id,species\\n1,' + 'x' * 60_000_000 + '\\n')", "MiB of memory to grade"),
    # past the size cap (a 2 GB file ends here too, or fills the sandbox's disk quota first)
    ("f.write('id,species\\n' + '1,setosa\\n' * 8_000_000)", "larger than"),
])  # fmt: skip
async def test_hostile_submissions_are_invalid_not_fatal(iris: Competition, writer: str, reason: str) -> None:
    program = f"with open('submission.csv', 'w') as f:\n    {writer}\n"
    async with MLEEvaluator(time_limit_s=30, grade_memory_mb=200, grade_time_limit_s=60) as evaluator:
        score = await evaluator.score_program(iris, program)
    assert score.total == 0.0 and score.components["valid_submission"] == 0.0
    assert score.components["errored"] == 0.0, score.detail
    assert score.detail.startswith("invalid submission:") and reason in score.detail, score.detail
