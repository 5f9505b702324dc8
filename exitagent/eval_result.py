"""An evaluation's figures (``exitagent.evaluate``'s module docstring says what each means):
``summarize`` turns the scored trajectories of every task into an ``EvalResult``, with its
intervals (``exitagent.stats``) and its secondary scores measured as the headline is."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import structlog

from exitagent.stats import RIGHT_AT, StatsError, bootstrap
from exitagent.trajectories import TaskResult

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class EvalResult:
    """The metrics of the module docstring, plus each task's trajectories."""

    steps: int
    samples: int
    accuracy_by_step: tuple[float | None, ...]  # None only when no iterate of that step was scored
    delta_k: float | None
    net_corrections: int
    corrections: dict[str, int]  # y^0 -> y^K: wrong_to_right, right_to_wrong, net
    corrections_by_step: tuple[dict[str, int], ...]  # step k-1 -> k, for k = 1..K
    scored_by_step: tuple[int, ...]
    failures_by_step: tuple[int, ...]
    truncated_by_step: tuple[int, ...]
    context_full_by_step: tuple[int, ...]
    policy_versions: dict[str, int]
    tasks: tuple[TaskResult, ...]
    elapsed_s: float = 0.0
    domain_metrics: dict[str, float] = field(default_factory=dict)  # each TaskResult.metrics key, mean over tasks
    intervals: dict[str, Any] | None = None  # exitagent.stats.Intervals.to_json(); None: under two tasks
    greedy: EvalResult | None = None  # the greedy one-sample pass, when there was one
    score: str = "accuracy"  # what accuracy_by_step measures (the domain's score_name)
    secondary: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> its curve, Delta_K, intervals

    def to_json(self, *, keep_texts: bool = False) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("tasks", "greedy")}
        out["greedy"] = None if self.greedy is None else self.greedy.to_json(keep_texts=keep_texts)
        out["num_tasks"] = len(self.tasks)
        out["num_trajectories"] = sum(len(t.trajectories) for t in self.tasks)
        out["evaluator_failures"] = sum(self.failures_by_step)
        out["per_task"] = [_task_json(t, keep_texts) for t in self.tasks]
        return out


def _task_json(result: TaskResult, keep_texts: bool) -> dict[str, Any]:
    row: dict[str, Any] = {"id": result.task.id, "answer": result.task.answer,
                           "scores": [[s.score for s in t] for t in result.trajectories]}
    if result.metrics:
        row["metrics"] = dict(result.metrics)
    if keep_texts:
        row["texts"] = [[s.text for s in t] for t in result.trajectories]
    return row


def _transitions(pairs: Sequence[tuple[float | None, float | None]]) -> dict[str, int]:
    scored = [(a >= RIGHT_AT, b >= RIGHT_AT) for a, b in pairs if a is not None and b is not None]
    up = sum(not a and b for a, b in scored)
    down = sum(a and not b for a, b in scored)
    return {"wrong_to_right": up, "right_to_wrong": down, "net": up - down}


def summarize(results: Sequence[TaskResult], steps: int, samples: int, elapsed_s: float = 0.0, *,
              score: str = "accuracy") -> EvalResult:
    """Accuracy per step, Delta_K and corrections over every trajectory of ``results``, for the
    headline ``score`` and for each of the steps' secondary scores."""
    runs = [t for r in results for t in r.trajectories]
    accuracy: list[float | None] = []
    for k in range(steps + 1):
        scores = [s for t in runs if (s := t[k].score) is not None]
        accuracy.append(sum(scores) / len(scores) if scores else None)
    first, last = accuracy[0], accuracy[-1]
    overall = _transitions([(t[0].score, t[steps].score) for t in runs])
    versions = Counter(s.version for t in runs for s in t if not s.context_full)
    extras: dict[str, list[float]] = {}
    for result in results:
        for key, value in result.metrics.items():
            extras.setdefault(key, []).append(value)
    return EvalResult(
        steps=steps, samples=samples, accuracy_by_step=tuple(accuracy),
        delta_k=None if first is None or last is None else last - first,
        net_corrections=overall["net"], corrections=overall,
        corrections_by_step=tuple(_transitions([(t[k - 1].score, t[k].score) for t in runs])
                                  for k in range(1, steps + 1)),
        scored_by_step=tuple(sum(t[k].score is not None for t in runs) for k in range(steps + 1)),
        failures_by_step=tuple(sum(t[k].score is None for t in runs) for k in range(steps + 1)),
        truncated_by_step=tuple(sum(t[k].truncated for t in runs) for k in range(steps + 1)),
        context_full_by_step=tuple(sum(t[k].context_full for t in runs) for k in range(steps + 1)),
        policy_versions=dict(sorted(versions.items())), tasks=tuple(results), elapsed_s=round(elapsed_s, 3),
        domain_metrics={k: sum(v) / len(v) for k, v in sorted(extras.items())}, intervals=_intervals(results),
        score=score, secondary=_secondary(results, steps, samples),
    )


def _secondary(results: Sequence[TaskResult], steps: int, samples: int) -> dict[str, dict[str, Any]]:
    """Each secondary score summarized as if it were the headline (the same means and intervals)."""
    names = sorted({name for r in results for t in r.trajectories for s in t for name in s.secondary})
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        rescored = [dataclasses.replace(r, trajectories=tuple(
            tuple(dataclasses.replace(s, score=s.secondary.get(name), secondary={}) for s in t)
            for t in r.trajectories)) for r in results]
        summary = summarize(rescored, steps, samples)
        out[name] = {"accuracy_by_step": summary.accuracy_by_step, "delta_k": summary.delta_k,
                     "net_corrections": summary.net_corrections, "corrections": summary.corrections,
                     "intervals": summary.intervals}
    return out


def _intervals(results: Sequence[TaskResult]) -> dict[str, Any] | None:
    try:
        return bootstrap([[[[s.score for s in t] for t in r.trajectories] for r in results]]).to_json()
    except StatsError as error:  # too few tasks to say anything: the report says "no interval"
        log.info("intervals_skipped", reason=str(error))
        return None
