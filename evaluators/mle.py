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
   against ``private/answers.csv`` (``evaluators.worlds.mle.grading``, or MLE-bench's grader for a
   real competition) in a child process with its own memory cgroup and wall clock: a hostile CSV
   (millions of columns, one giant field) costs that child, never this process. Missing, invalid,
   or too big to grade within ``grade_memory_mb`` / ``grade_time_limit_s``: 0 with the reason.
   Valid: the raw metric, normalised between the competition's worst and best reference scores to
   [0, 1].

Infrastructure failures (no bubblewrap, a sandbox that died, unreadable answers) raise
``EvaluatorError``: the rollout is excluded, never scored 0. Components: ``errored``,
``timed_out``, ``out_of_memory``, ``format_error``, ``valid_submission``, ``raw`` (the metric, when
valid) and ``runtime_s``.
"""

from __future__ import annotations

import errno
import json
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import anyio
import anyio.to_thread
import structlog

from evaluators.worlds.mle import Competition, load_competition
from exitagent.errors import ConfigError, EvaluatorError, SandboxError
from exitagent.types import Score, Task
from sandboxes.base import ExecResult, Limits, Sandbox, sandbox_env
from sandboxes.cgroups import CgroupPool
from sandboxes.factory import open_sandbox
from sandboxes.runner import run_limited

log = structlog.get_logger(__name__)

DATA_ENV = "DATA_DIR"  # the environment variable that names the public data directory
DATA_MOUNT = "data"  # where public/ appears, relative to the sandbox workspace
PROGRAM = "solution.py"
SUBMISSION = "submission.csv"
MAX_SUBMISSION_BYTES = 64 << 20
# Where the grading child imports exitagent from: the tree this package sits in (PYTHONPATH), beside
# exitagent/. Found from this file, not from exitagent's: evaluators sit below the package's API.
_PROJECT_ROOT = str(Path(__file__).resolve().parents[1])
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
                 workers: int = 2, base_dir: Path | None = None, trace_chars: int = TRACE_CHARS,
                 grade_memory_mb: int = 1024, grade_time_limit_s: float = 120.0) -> None:
        if time_limit_s <= 0 or min(memory_mb, grade_memory_mb) < 64 or workers < 1 or grade_time_limit_s <= 0:
            raise ConfigError("mle evaluator: time limits > 0, memory >= 64 MiB and workers >= 1 are needed")
        self.time_limit_s, self.memory_mb, self.backend = time_limit_s, memory_mb, backend
        self.base_dir, self.trace_chars = base_dir, trace_chars
        self.limits = Limits(wall_s=time_limit_s, memory_bytes=memory_mb << 20, max_processes=64,
                             max_file_bytes=MAX_SUBMISSION_BYTES * 4, tmp_bytes=256 << 20)
        self.grade_limits = Limits(wall_s=grade_time_limit_s, memory_bytes=grade_memory_mb << 20,
                                   max_processes=16, max_file_bytes=1 << 20, disk_bytes=None)
        self._slots = anyio.CapacityLimiter(workers)
        self._grade_cgroups: CgroupPool | None = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._grade_cgroups is not None:
            with anyio.CancelScope(shield=True):
                await self._grade_cgroups.close()
            self._grade_cgroups = None

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
        if isinstance(submission, str):
            return result, Verdict(None, submission)
        return result, await self._grade(competition, submission)

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

    async def _grade(self, competition: Competition, submission: bytes) -> Verdict:
        """Grade in a child under ``grade_limits``; what exhausts them is an invalid submission."""
        if self._grade_cgroups is None:
            self._grade_cgroups = CgroupPool()
        with tempfile.TemporaryDirectory(prefix="exitagent-grade-", dir=self.base_dir) as scratch:
            path = Path(scratch) / SUBMISSION
            await anyio.to_thread.run_sync(path.write_bytes, submission)
            argv = [sys.executable, "-m", "evaluators.worlds.mle.grading", str(competition.root), str(path)]
            # The child imports the same exitagent as this process, wherever that was found.
            env = sandbox_env(scratch, [str(Path(sys.executable).parent), "/usr/bin", "/bin"],
                              {"PYTHONPATH": _PROJECT_ROOT})
            try:
                result = await run_limited(argv, cwd=Path(scratch), env=env, limits=self.grade_limits,
                                           cgroups=self._grade_cgroups)
            except SandboxError as error:
                raise EvaluatorError(f"grading {competition.id} could not start: {error}") from error
        return self._verdict(competition, result)

    def _verdict(self, competition: Competition, result: ExecResult) -> Verdict:
        limits = self.grade_limits
        if result.out_of_memory:
            mib = (limits.memory_bytes or 0) >> 20
            return Verdict(None, f"{SUBMISSION} needs more than {mib} MiB of memory to grade")
        if result.timed_out:
            return Verdict(None, f"{SUBMISSION} took longer than {limits.wall_s:g} s to grade")
        lines = result.stdout.strip().splitlines()
        try:
            said = json.loads(lines[-1]) if lines else {}
        except json.JSONDecodeError:
            said = {}
        if result.exit_code != 0 or "raw" not in said:
            why = said.get("error") or f"exit {result.exit_code}: {result.stderr.strip()[-500:]}"
            raise EvaluatorError(f"grading {competition.id} failed: {why}")
        raw = said["raw"]
        return Verdict(float(raw) if raw is not None else None, str(said.get("reason", "")))


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
