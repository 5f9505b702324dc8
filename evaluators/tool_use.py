"""The BFCL multi-turn checker: per-request verdicts from a replay of the model's calls.

The response a tool-use rollout hands in is its call record (``CallRecord.to_json``): the entry
id and, for each request the episode reached, the call strings the model made, in order. The
checker replays them on fresh instances (``BfclEnv``, the safe executor) and the ground-truth
calls on another set, request by request, and judges each request as BFCL's
``multi_turn_checker`` judges a turn:

- a request with ground-truth calls passes when the model made at least one call, the state of
  every involved class equals the ground truth's (all public attributes), and every ground-truth
  result appears among ALL the model's results so far (a multiset: each result matches once);
- an irrelevance request (no ground-truth calls) passes only when the model made no call
  (BFCL's ``multi_turn_irrelevance_checker``).

State is cumulative: the model's calls of earlier requests stay in effect. Reward 1 per passing
request; ``Score.total`` is 1.0 when every request of the record passes (BFCL's entry accuracy,
and for training, which uses the first request only, the first-request reward). Components:
``requests``, ``passed`` (the total return), ``first_request``, ``calls``, ``errored`` (always
0: a failing call is a model mistake the model saw, not a crash), and ``unparseable``: 1.0 when a
request that needed calls got no valid one (the episode ran out of tokens or turns, or wrote text
that parses as no call). That is the "no valid action" signal of the paper's overlong filtering:
``training.update --drop-unparseable`` leaves such rollouts out of the loss. An irrelevance
request answered without calls is a right answer, not a missing action.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import anyio
import structlog

from evaluators.worlds.bfcl.env import BfclEnv, Entry, get_entry
from exitagent.errors import ConfigError, EvaluatorError
from exitagent.types import Score, Task

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class CallRecord:
    """The calls a model made, per request (what the checker scores)."""

    entry_id: str
    calls: tuple[tuple[str, ...], ...]

    def to_json(self) -> str:
        return json.dumps({"entry": self.entry_id, "calls": [list(c) for c in self.calls]})

    @classmethod
    def from_json(cls, text: str) -> CallRecord:
        data = json.loads(text)
        return cls(str(data["entry"]), tuple(tuple(str(c) for c in turn) for turn in data["calls"]))


@dataclass(frozen=True)
class RequestVerdict:
    passed: bool
    reason: str = ""  # "" | "no_call" | "state_mismatch" | "response_mismatch" | "irrelevance_call"


def missing_results(expected: Sequence[str], seen: Sequence[str]) -> list[str]:
    """The items of ``expected`` not matched one-for-one in ``seen`` (unordered multiset)."""
    left = Counter(seen)
    missing = []
    for item in expected:
        if left[item] > 0:
            left[item] -= 1
        else:
            missing.append(item)
    return missing


def check(entry: Entry, model_calls: Sequence[Sequence[str]]) -> tuple[RequestVerdict, ...]:
    """One verdict per request of ``model_calls`` (a prefix of the entry's requests)."""
    if len(model_calls) > len(entry.requests):
        raise ValueError(f"{len(model_calls)} requests of calls for {entry.id}, which has {len(entry.requests)}")
    model, truth = BfclEnv.fresh(entry), BfclEnv.fresh(entry)
    seen: list[str] = []
    verdicts = []
    for calls, expected_calls in zip(model_calls, entry.ground_truth, strict=False):
        seen += model.run_all(calls)  # an irrelevance request's calls still run: later states depend on them
        expected = truth.run_all(expected_calls)
        if not expected_calls:
            verdicts.append(RequestVerdict(not calls, "irrelevance_call" if calls else ""))
        elif not calls:
            verdicts.append(RequestVerdict(False, "no_call"))
        elif model.state() != truth.state():
            verdicts.append(RequestVerdict(False, "state_mismatch"))
        elif missing_results(expected, seen):
            verdicts.append(RequestVerdict(False, "response_mismatch"))
        else:
            verdicts.append(RequestVerdict(True))
    return tuple(verdicts)


def score_record(record: CallRecord) -> Score:
    entry = get_entry(record.entry_id)
    verdicts = check(entry, record.calls)
    passed = sum(v.passed for v in verdicts)
    components = {"requests": float(len(verdicts)), "passed": float(passed),
                  "first_request": float(bool(verdicts) and verdicts[0].passed),
                  "calls": float(sum(len(c) for c in record.calls)), "errored": 0.0,
                  "unparseable": float(any(v.reason == "no_call" for v in verdicts))}
    detail = " ".join(f"{i}:{'ok' if v.passed else v.reason}" for i, v in enumerate(verdicts))
    return Score(float(bool(verdicts) and passed == len(verdicts)), components, detail)


class ToolUseEvaluator:
    """Scores call records in a worker thread, off the event loop.

    A replay takes milliseconds (the API classes are plain Python, the Math API's sizes are
    bounded); the safe executor runs one BFCL call at a time in the process and restores the
    numeric state ``MathAPI`` changes (mpmath's global precision, the decimal context). An async
    context manager like the other evaluators. A record that is not valid JSON or names an unknown
    entry is our own bug, not the model's: ``EvaluatorError``.
    """

    async def __aenter__(self) -> ToolUseEvaluator:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def score(self, task: Task, response: str) -> Score:
        try:
            record = CallRecord.from_json(response)
        except (ValueError, KeyError, TypeError) as error:
            raise EvaluatorError(f"task {task.id}: not a tool-use call record: {error}") from error
        try:
            return await anyio.to_thread.run_sync(score_record, record)
        except (ConfigError, ValueError) as error:
            raise EvaluatorError(f"task {task.id}: {error}") from error
