"""MLE evaluator: run the policy's ``solution.py`` in a sandbox, grade its ``submission.csv`` on the host.

Flow of ``MLEEvaluator.score(task, response)``:

1. ``extract_program``: the program is the response's one fenced code block (a ```python block
   first, else the first bare one). No block: a format failure, score 0 (``format_error``).
2. A fresh sandbox (``local`` = bubblewrap by default) gets ``solution.py`` and the competition's
   ``public/`` directory, read-only, at ``data/``; ``DATA_DIR`` names it. ``private/`` is never
   mounted. The program runs under a wall-clock and memory limit; at most ``workers`` programs run
   at once (the machines have two cores), and the sandbox, its files and every process it started
   are gone before ``score`` returns.
3. A crash (non-zero exit, killed at the time limit, out of memory) scores 0 with
   ``errored`` = 1 and the error output as ``detail``: the trace a debug step shows under the code.
4. Otherwise ``submission.csv`` is read from the sandbox (size-capped, no links followed) and graded
   against ``private/answers.csv`` (``exitagent.competitions.grading``, or MLE-bench's grader for a
   real competition). Missing or invalid: 0 with the reason. Valid: the raw metric, normalised
   between the competition's worst and best reference scores to [0, 1].

Infrastructure failures (no bubblewrap, a sandbox that died, unreadable answers) raise
``EvaluatorError``: the rollout is excluded, never scored 0. Components: ``errored``,
``timed_out``, ``out_of_memory``, ``format_error``, ``valid_submission``, ``raw`` (the metric, when
valid) and ``runtime_s``.
"""

from __future__ import annotations

import errno
import io
import re
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import anyio
import anyio.to_thread
import structlog

from exitagent.competitions import Competition, load_competition
from exitagent.errors import ConfigError, EvaluatorError, SandboxError
from exitagent.types import Score, Task
from sandboxes.base import ExecResult, Limits, Sandbox, open_sandbox

if TYPE_CHECKING:
    import pandas as pd

log = structlog.get_logger(__name__)

DATA_ENV = "DATA_DIR"  # the environment variable that names the public data directory
DATA_MOUNT = "data"  # where public/ appears, relative to the sandbox workspace
PROGRAM = "solution.py"
SUBMISSION = "submission.csv"
MAX_SUBMISSION_BYTES = 64 << 20
TRACE_CHARS = 3000  # the tail of the error output a debug step sees (tracebacks end with the cause)

_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:^[ \t]*```[ \t]*$|\Z)", re.DOTALL | re.MULTILINE)
_PYTHON_TAGS = ("python", "python3", "py")


def extract_program(response: str) -> str | None:
    """The program in ``response``: its ```python block (or first bare block); None when there is none.

    An opening fence that never closes (the answer ran out of tokens) still yields its code: the
    program will most likely fail, and its trace is worth more to a debug step than nothing.
    """
    blocks = [(tag.lower(), code) for tag, code in _FENCE.findall(response)]
    for wanted in (lambda t: t in _PYTHON_TAGS, lambda t: t == ""):
        for tag, code in blocks:
            if wanted(tag) and code.strip():
                return code.rstrip() + "\n"
    return None


def competition_of(task: Task) -> Competition:
    directory = task.metadata.get("competition_dir")
    if not directory:
        raise EvaluatorError(f"task {task.id} has no competition_dir: not an MLE task")
    try:
        return load_competition(Path(directory))
    except ConfigError as error:
        raise EvaluatorError(str(error)) from error


@dataclass(frozen=True)
class Verdict:
    """A graded submission: the raw metric, or why there is none."""

    raw: float | None
    reason: str = ""


class MLEEvaluator:
    """Scores MLE responses (module docstring). Use as ``async with MLEEvaluator() as evaluator``."""

    def __init__(self, *, time_limit_s: float = 60.0, memory_mb: int = 2048, backend: str = "local",
                 workers: int = 2, base_dir: Path | None = None, trace_chars: int = TRACE_CHARS) -> None:
        if time_limit_s <= 0 or memory_mb < 64 or workers < 1:
            raise ConfigError("mle evaluator: time limit > 0, memory >= 64 MiB and workers >= 1 are needed")
        self.time_limit_s, self.memory_mb, self.backend = time_limit_s, memory_mb, backend
        self.base_dir, self.trace_chars = base_dir, trace_chars
        self.limits = Limits(wall_s=time_limit_s, memory_bytes=memory_mb << 20, max_processes=64,
                             max_file_bytes=MAX_SUBMISSION_BYTES * 4, tmp_bytes=256 << 20)
        self._slots = anyio.CapacityLimiter(workers)
        self._answers: dict[Path, pd.DataFrame] = {}

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self._answers.clear()

    async def score(self, task: Task, response: str) -> Score:
        program = extract_program(response)
        if program is None:
            return Score(0.0, {"format_error": 1.0, "errored": 0.0, "valid_submission": 0.0},
                         "format error: the response has no fenced ```python code block")
        return await self.score_program(competition_of(task), program)

    async def score_program(self, competition: Competition, program: str) -> Score:
        """Run ``program`` on ``competition`` in a sandbox and grade what it wrote."""
        result, verdict = await self.run_and_grade(competition, program)
        base = {"format_error": 0.0, "timed_out": float(result.timed_out),
                "out_of_memory": float(result.out_of_memory), "runtime_s": round(result.duration_s, 3)}
        if verdict is None:
            return Score(0.0, {**base, "errored": 1.0, "valid_submission": 0.0}, self._trace(result))
        if verdict.raw is None:
            reason = f"invalid submission: {verdict.reason}"
            return Score(0.0, {**base, "errored": 0.0, "valid_submission": 0.0}, reason)
        total = competition.normalise(verdict.raw)
        detail = f"{competition.metric} {verdict.raw:.6g} (normalised {total:.4f})"
        return Score(total, {**base, "errored": 0.0, "valid_submission": 1.0, "raw": verdict.raw}, detail)

    async def run_and_grade(self, competition: Competition, program: str) -> tuple[ExecResult, Verdict | None]:
        """The run, and the graded submission (None when the program crashed: nothing is graded)."""
        result, submission = await self._run(competition, program)
        if not result.ok:
            log.info("program_crashed", competition=competition.id, exit_code=result.exit_code,
                     timed_out=result.timed_out, out_of_memory=result.out_of_memory)
            return result, None
        return result, await anyio.to_thread.run_sync(self._grade, competition, submission)

    async def _run(self, competition: Competition, program: str) -> tuple[ExecResult, bytes | str]:
        host_backend = self.base_dir is not None and self.backend in ("local", "process")
        options: dict[str, Any] = {"base_dir": self.base_dir} if host_backend else {}
        try:
            async with self._slots, open_sandbox(self.backend, limits=self.limits,
                                                 inputs={DATA_MOUNT: competition.public_dir}, **options) as sandbox:
                await sandbox.write_file(PROGRAM, program)
                python = getattr(sandbox, "python", "python")
                result = await sandbox.exec([python, PROGRAM], env={DATA_ENV: f"{sandbox.workdir}/{DATA_MOUNT}"})
                return result, await _read_submission(sandbox)
        except (SandboxError, ConfigError) as error:
            raise EvaluatorError(f"sandbox failed for {competition.id}: {error}") from error

    def _trace(self, result: ExecResult) -> str:
        if result.timed_out:
            head = f"Killed: the program ran past the time limit of {self.time_limit_s:g} s."
        elif result.out_of_memory:
            head = f"Killed: the program ran out of memory (limit {self.memory_mb} MiB)."
        else:
            head = f"The program exited with code {result.exit_code}."
        tail = result.stderr.strip()[-self.trace_chars:]
        return f"{head}\n{tail}" if tail else head

    def _grade(self, competition: Competition, submission: bytes | str) -> Verdict:
        import pandas as pd  # here, not at import: the domains load without pandas

        from exitagent.competitions.grading import InvalidSubmission, grade

        if isinstance(submission, str):
            return Verdict(None, submission)
        try:
            frame = pd.read_csv(io.BytesIO(submission))
        except (ValueError, UnicodeDecodeError) as error:  # pandas' parser errors are ValueErrors
            return Verdict(None, f"{SUBMISSION} is not a readable CSV: {str(error)[:200]}")
        try:
            if competition.source == "mlebench":
                from exitagent.competitions.mlebench import grade_mlebench

                raw = grade_mlebench(competition, frame)
                return Verdict(raw, "" if raw is not None else "MLE-bench's grader rejected the submission")
            return Verdict(grade(competition, frame, self._answers_of(competition)))
        except InvalidSubmission as error:
            return Verdict(None, str(error))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise EvaluatorError(f"grading {competition.id} failed: {type(error).__name__}: {error}") from error

    def _answers_of(self, competition: Competition) -> pd.DataFrame:
        import pandas as pd

        if competition.answers_path not in self._answers:
            self._answers[competition.answers_path] = pd.read_csv(competition.answers_path)
        return self._answers[competition.answers_path]


async def _read_submission(sandbox: Sandbox) -> bytes | str:
    """The submission's bytes, or why there is no usable one."""
    try:
        data = await sandbox.read_file(SUBMISSION, binary=True, max_bytes=MAX_SUBMISSION_BYTES)
    except FileNotFoundError:
        return f"the program wrote no {SUBMISSION} in its working directory"
    except OSError as error:
        if error.errno == errno.EFBIG:
            return f"{SUBMISSION} is larger than {MAX_SUBMISSION_BYTES} bytes"
        return f"{SUBMISSION} is not a regular file ({error})"  # a link, a pipe or a directory
    return data if isinstance(data, bytes) else data.encode()
