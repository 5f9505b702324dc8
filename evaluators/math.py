"""Math evaluator: extract a final answer, check it against the gold answer, reward 1 or 0.

Flow: ``extract_answer`` tries the extractors in order of preference (``\\boxed{}``, GSM8K
``####``, "the answer is ...", the last number) and keeps the first that finds something. Then
``MathEvaluator.equivalent`` decides: identical text or plain numbers are settled here in
microseconds; anything else goes to math-verify (gold first) in a worker process.

Why worker processes: math-verify's own timeouts use ``signal.alarm``, which works only in the
main thread, and sympy can spin for ever on inputs like ``9^{9^{9^{9}}}``. So math-verify runs
with its timeouts off inside ``VerifierPool``, whose workers are separate Python processes; a
call past its deadline kills its worker (the next call starts a fresh one) and raises
``EvaluatorError``. The pool is synchronous and thread-safe; ``MathEvaluator.score`` reaches it
through ``anyio.to_thread.run_sync`` so many anyio tasks can score at once. Workers are plain
subprocesses, so scoring works from any script (no ``__main__`` guard needed).

Score: ``total`` 1.0 or 0.0; ``components`` hold ``correct`` and one ``extractor_<name>`` flag per
extractor (1.0 for the one that fired, all 0.0 when none did); ``detail`` is the extracted answer.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from multiprocessing.connection import Connection
from typing import Any

import anyio
import structlog

from exitagent.errors import EvaluatorError
from exitagent.types import Score, Task

log = structlog.get_logger(__name__)

EXTRACTORS = ("boxed", "hash", "answer_is", "last_number")
# Gold answers are at most ~200 characters; a longer "final answer" is rambling, not an answer,
# and would only feed sympy something slow. It scores 0 (a model mistake), unchecked.
MAX_ANSWER_CHARS = 1000

# --- extraction -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Extraction:
    """A final answer found in a response, and which extractor found it."""

    extractor: str  # one of EXTRACTORS
    answer: str


_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASH = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_IS = re.compile(r"answer\s*(?:is\b|:)[\s:*]*([^\n]*)", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?:\s|$)")
# A "-" is a sign only where no word or ")" precedes it: "pages 10-12" ends in 12, not -12.
_LAST_NUMBER = re.compile(r"(?:(?<![\w)])-)?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)")


def _brace_content(text: str, start: int, end: int | None = None) -> str | None:
    """The text inside the brace that opens just before ``start``, or None if it does not close before ``end``."""
    depth, i, end = 1, start, len(text) if end is None else end
    while i < end:
        char = text[i]
        if char == "\\":  # \{ and \} are literal braces in LaTeX, not grouping
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
        i += 1
    return None


def _extract_boxed(response: str) -> str | None:
    # The last *complete* box: a response cut off inside its final \boxed{ still has earlier ones.
    # An earlier box that is still open where an unclosed later one starts never closes either, so
    # each scan stops there: linear, where rescanning to the end was quadratic (5000 open boxes: 17 s).
    limit = len(response)
    for match in reversed(list(_BOXED.finditer(response))):
        content = _brace_content(response, match.end(), limit)
        if content is not None:
            return content
        limit = match.start()
    return None


def _extract_hash(response: str) -> str | None:
    matches = _HASH.findall(response)
    return matches[-1] if matches else None


def _extract_answer_is(response: str) -> str | None:
    matches = _ANSWER_IS.findall(response)
    if not matches:
        return None
    # "The answer is 3.5. Let me check" -> "3.5": cut at the first full stop followed by a space.
    return _SENTENCE_END.split(matches[-1], maxsplit=1)[0]


def _extract_last_number(response: str) -> str | None:
    matches = _LAST_NUMBER.findall(response)
    return matches[-1] if matches else None


_EXTRACTOR_FUNCTIONS: dict[str, Callable[[str], str | None]] = {
    "boxed": _extract_boxed,
    "hash": _extract_hash,
    "answer_is": _extract_answer_is,
    "last_number": _extract_last_number,
}


def clean_answer(text: str) -> str:
    """Strip what surrounds an answer but is not part of it: spaces, ``$``, ``\\(..\\)``, ``**``, a final ``.``."""
    text = text.strip()
    for left, right in (("\\(", "\\)"), ("\\[", "\\]")):
        if text.startswith(left) and text.endswith(right):
            text = text[len(left) : -len(right)]
    previous = None
    while text != previous:  # "**42**." and "$5$." need more than one pass
        previous = text
        text = text.strip().strip("*$").rstrip(".")
    return text


def extract_answer(response: str) -> Extraction | None:
    """The final answer in ``response`` by the first extractor (in ``EXTRACTORS`` order) that finds one."""
    for name in EXTRACTORS:
        found = _EXTRACTOR_FUNCTIONS[name](response)
        if found is not None and clean_answer(found):
            return Extraction(name, clean_answer(found))
    return None


# --- the cheap checks -------------------------------------------------------------------------

_PLAIN_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+|)(?:\.\d+)?")


def as_plain_number(text: str) -> Decimal | None:
    """``"1,000"``, ``"-0.5"``, ``"\\$18"`` -> a Decimal; anything that is not a plain number -> None."""
    text = text.replace("\\$", "").replace("\\!", "").replace("{,}", ",").strip().strip("$").strip()
    if not text or not _PLAIN_NUMBER.fullmatch(text) or not any(c.isdigit() for c in text):
        return None
    try:
        return Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None


def quick_verdict(gold: str, answer: str) -> bool | None:
    """True/False when settled without sympy (same text, or plain numbers); None means "ask math-verify"."""
    if re.sub(r"\s+", "", gold) == re.sub(r"\s+", "", answer):
        return True
    gold_number, answer_number = as_plain_number(gold), as_plain_number(answer)
    if gold_number is None or answer_number is None:
        return None
    if gold_number == answer_number:
        return True
    if gold_number == gold_number.to_integral_value() and answer_number == answer_number.to_integral_value():
        return False
    return None  # unequal decimals: math-verify's rounding rules decide (e.g. 0.333333 vs 0.3333333)


# --- math-verify, in worker processes ---------------------------------------------------------


def math_verify_equivalent(gold: str, answer: str) -> bool:
    """math-verify's verdict on two bare answers, gold first. Runs inside a pool worker."""
    from math_verify import parse, verify

    # Both sides are bare answers already, so box them: math-verify then reads each as one answer.
    gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=None)
    if not gold_parsed:
        raise ValueError(f"math-verify cannot parse the gold answer {gold!r}")
    answer_parsed = parse(f"\\boxed{{{answer}}}", parsing_timeout=None)
    return bool(verify(gold_parsed, answer_parsed, timeout_seconds=None))


def _serve(inbox: Connection, outbox: Connection) -> None:
    """Worker process main loop: import the heavy modules once, say ready, then answer calls."""
    import math_verify  # noqa: F401  (import before "ready" so no call's deadline pays for it)

    # It warns once that its timeouts are off; that is deliberate here, the pool enforces them.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    outbox.send(("ready", None))
    while True:
        try:
            function, args = inbox.recv()
        except EOFError:  # the pool closed its end
            return
        try:
            outbox.send(("ok", function(*args)))
        except Exception as error:
            outbox.send(("error", f"{type(error).__name__}: {error}"))


def _serve_fds(inbox_fd: int, outbox_fd: int) -> None:
    """Entry point of a worker process started by ``_Worker`` (two pipe descriptors)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it closes the pool
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    _serve(Connection(inbox_fd, writable=False), Connection(outbox_fd, readable=False))


def _exit_with_parent(parent: int) -> None:
    """End this worker once its parent is gone, even mid-call (sympy may spin for ever).

    An idle worker would also see EOF on its pipe; this covers a busy one. No parent-death signal:
    workers are started from pool threads, and the kernel sends it when the forking thread ends."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


_WORKER_CODE = "import sys; from evaluators.math import _serve_fds; _serve_fds(int(sys.argv[1]), int(sys.argv[2]))"


class _Worker:
    """One worker process and its two pipes.

    A plain subprocess rather than multiprocessing: multiprocessing's spawn re-imports the
    caller's ``__main__`` in the child, which breaks any user script without an
    ``if __name__ == "__main__"`` guard (and fork is unsafe in a process with threads).
    """

    def __init__(self, start_timeout_s: float) -> None:
        child_in, parent_out = os.pipe()
        parent_in, child_out = os.pipe()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        # Its own session: a terminal's Ctrl-C (sent to the foreground process group) does not reach
        # it, even while it starts up, so it prints no KeyboardInterrupt traceback; the parent closes it.
        self.process = subprocess.Popen([sys.executable, "-c", _WORKER_CODE, str(child_in), str(child_out)],
                                        pass_fds=(child_in, child_out), stdin=subprocess.DEVNULL, env=env,
                                        start_new_session=True)
        os.close(child_in)
        os.close(child_out)
        self.to_worker = Connection(parent_out, readable=False)
        self.conn = Connection(parent_in, writable=False)
        if not self.conn.poll(start_timeout_s):
            self.kill()
            raise EvaluatorError(f"math worker did not start within {start_timeout_s:.0f} s")
        try:
            self.conn.recv()
        except EOFError as error:
            self.kill()
            raise EvaluatorError(f"math worker died while starting (exit code {self.process.poll()})") from error

    def call(self, function: Callable[..., Any], args: tuple[Any, ...], timeout_s: float) -> Any:
        self.to_worker.send((function, args))
        if not self.conn.poll(timeout_s):
            raise TimeoutError
        status, value = self.conn.recv()  # EOFError when the process died mid-call
        if status == "error":
            raise EvaluatorError(f"math check raised {value}")
        return value

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self.conn.close()
        self.to_worker.close()


class VerifierPool:
    """Up to ``workers`` worker processes running picklable functions, each call with a deadline.

    ``run`` blocks (call it from a worker thread in async code) and is safe from many threads.
    A call past ``timeout_s`` kills its worker and raises ``EvaluatorError``; so does a worker that
    dies. Workers start on first use, so an idle evaluator costs nothing.
    """

    def __init__(self, *, workers: int = 2, timeout_s: float = 5.0, start_timeout_s: float = 120.0) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        self._slots = threading.BoundedSemaphore(workers)
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._live: set[_Worker] = set()
        self._closed = False

    def run(self, function: Callable[..., Any], *args: Any, timeout_s: float | None = None) -> Any:
        deadline_s = self.timeout_s if timeout_s is None else timeout_s
        with self._slots:  # at most `workers` calls in flight, so at most `workers` processes
            worker = self._take()
            try:
                result = worker.call(function, args, deadline_s)
            except TimeoutError:
                self._discard(worker)
                log.warning("math_check_timed_out", function=function.__name__, timeout_s=deadline_s)
                raise EvaluatorError(f"math check {function.__name__} timed out after {deadline_s} s") from None
            except (EOFError, OSError) as error:
                self._discard(worker)
                raise EvaluatorError(f"math worker died during {function.__name__}") from error
            except EvaluatorError:
                self._give_back(worker)  # the function raised; the process itself is fine
                raise
            except BaseException:  # interrupted mid-call: the worker's pipe state is unknown
                self._discard(worker)
                raise
            self._give_back(worker)
            return result

    def _take(self) -> _Worker:
        with self._lock:
            if self._closed:
                raise EvaluatorError("math verifier pool is closed")
            if self._idle:
                return self._idle.pop()
        worker = _Worker(self.start_timeout_s)  # outside the lock: starting takes a second or two
        with self._lock:
            self._live.add(worker)
        log.debug("math_worker_started", pid=worker.process.pid)
        return worker

    def _give_back(self, worker: _Worker) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(worker)
                return
        self._discard(worker)

    def _discard(self, worker: _Worker) -> None:
        with self._lock:
            self._live.discard(worker)
        worker.kill()

    def close(self) -> None:
        """Kill every worker. Calls in flight fail with ``EvaluatorError``; later calls too."""
        with self._lock:
            self._closed = True
            workers, self._live, self._idle = list(self._live), set(), []
        for worker in workers:
            worker.kill()


# --- the evaluator ----------------------------------------------------------------------------


class MathEvaluator:
    """Reward 1.0 when the response's final answer is equivalent to ``task.answer``, else 0.0.

    Use as ``async with MathEvaluator() as evaluator:`` (or call ``close``) so its worker
    processes end with it; they are daemons, so they also die with the program.
    """

    def __init__(self, *, workers: int = 2, timeout_s: float = 5.0) -> None:
        self.pool = VerifierPool(workers=workers, timeout_s=timeout_s)

    async def equivalent(self, gold: str, answer: str) -> bool:
        """Whether ``answer`` is equivalent to ``gold``. Raises ``EvaluatorError`` on timeout."""
        gold, answer = clean_answer(gold), clean_answer(answer)
        verdict = quick_verdict(gold, answer)
        if verdict is not None:
            return verdict
        # abandon_on_cancel: a cancelled scorer need not wait out a slow check; the thread still
        # hands its worker back (or kills it at the deadline) when the check ends.
        return bool(
            await anyio.to_thread.run_sync(self.pool.run, math_verify_equivalent, gold, answer, abandon_on_cancel=True)
        )

    async def score(self, task: Task, response: str) -> Score:
        if task.answer is None or not str(task.answer).strip():
            raise EvaluatorError(f"math task {task.id} has no gold answer")
        extraction = extract_answer(response)
        components = {f"extractor_{name}": 0.0 for name in EXTRACTORS}
        if extraction is None:
            return Score(total=0.0, components={"correct": 0.0, **components}, detail="")
        components[f"extractor_{extraction.extractor}"] = 1.0
        if len(extraction.answer) > MAX_ANSWER_CHARS:
            return Score(total=0.0, components={"correct": 0.0, **components}, detail=extraction.answer[:200])
        try:
            correct = float(await self.equivalent(str(task.answer), extraction.answer))
        except EvaluatorError:
            log.warning("math_score_failed", task_id=task.id, answer=extraction.answer[:200])
            raise
        return Score(total=correct, components={"correct": correct, **components}, detail=extraction.answer)

    def close(self) -> None:
        self.pool.close()

    def __enter__(self) -> MathEvaluator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> MathEvaluator:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
