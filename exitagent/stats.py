"""95% intervals for the evaluation's metrics: a paired bootstrap over tasks, and over seeds.

The unit of resampling is the task, not the sample: the n samples of a task share its difficulty,
so treating them as independent would make intervals too narrow. An evaluation is an array
``scores_TNK[task, sample, step]`` (NaN: the evaluator failed on that iterate, which counts in no
average, as in ``exitagent.evaluate``). One bootstrap draw picks T tasks with replacement and
recomputes every statistic exactly as the point estimate is computed:

- accuracy at step k: the mean over the drawn tasks' scored iterates of step k (avg@n);
- Delta_k = accuracy[k] - accuracy[0] *of the same draw*: paired, so what a task's difficulty
  adds to both steps cancels, and the interval is that of the change, not of two levels;
- net corrections: (wrong -> right) - (right -> wrong) from y^0 to y^K, over the drawn tasks'
  trajectories (a count, as reported).

The interval is the 2.5 and 97.5 percentiles of the draws (percentile bootstrap). Draws come from
``numpy.random.default_rng(seed)``: the same scores give the same interval on every run.

Several seeds (independent evaluations, e.g. a variant trained with three seeds, each evaluated on
its own task draw): a two-stage bootstrap. Each draw picks S seeds with replacement, then T tasks
with replacement within each picked seed, and averages the S seeds' statistics; the estimate is
the mean over seeds. Seeds are the outer stage because that is where training randomness lives:
with 3 seeds that stage is coarse (a resample of 3 values), which widens the interval honestly
rather than pretending the seeds are one large evaluation. The tasks of different seeds differ,
so there is nothing to pair across seeds; pairing stays within each seed's trajectories.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RIGHT_AT = 1.0  # a score at least this is "right" for corrections (math scores are 0 or 1)
DRAWS = 2000
LEVEL = 0.95

Scores = Sequence[Sequence[Sequence[float | None]]]  # [task][sample][step]


class StatsError(ValueError):
    """Scores an interval cannot be computed from (no tasks, one task, ragged steps)."""


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float

    def to_json(self) -> dict[str, float]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high}

    def points(self, scale: float = 100.0, sign: bool = False) -> str:
        """``12.3 [10.1, 14.6]``: the estimate and its interval, times ``scale``."""
        spec = "+.1f" if sign else ".1f"
        return f"{scale * self.estimate:{spec}} [{scale * self.low:{spec}}, {scale * self.high:{spec}}]"


@dataclass(frozen=True)
class Intervals:
    """Every metric of an evaluation with its interval; None where nothing was scored."""

    accuracy_by_step: tuple[Interval | None, ...]
    delta_by_step: tuple[Interval | None, ...]  # Delta_k for k = 0..K (k = 0: zero by definition)
    net_corrections: Interval
    tasks: int
    seeds: int
    draws: int

    @property
    def delta_k(self) -> Interval | None:
        return self.delta_by_step[-1]

    def to_json(self) -> dict[str, object]:
        def one(i: Interval | None) -> dict[str, float] | None:
            return None if i is None else i.to_json()

        return {"method": "paired percentile bootstrap over tasks" + (", seeds then tasks" if self.seeds > 1 else ""),
                "level": LEVEL, "draws": self.draws, "tasks": self.tasks, "seeds": self.seeds,
                "accuracy_by_step": [one(i) for i in self.accuracy_by_step],
                "delta_by_step": [one(i) for i in self.delta_by_step], "delta_k": one(self.delta_k),
                "net_corrections": self.net_corrections.to_json()}


def as_array(scores: Scores) -> np.ndarray:
    """[task][sample][step] with None for failures -> float array ``T x N x (K+1)``, NaN-padded
    where tasks have fewer samples. Raises ``StatsError`` for no tasks or unequal step counts."""
    if len(scores) == 0:
        raise StatsError("no tasks: an interval needs at least two tasks")
    steps = {len(trajectory) for task in scores for trajectory in task}
    if len(steps) != 1 or 0 in steps:
        raise StatsError(f"every trajectory needs the same number of steps (got {sorted(steps) or 'none'})")
    width, samples = steps.pop(), max(len(task) for task in scores)
    out = np.full((len(scores), samples, width), np.nan)
    for t, task in enumerate(scores):
        for n, trajectory in enumerate(task):
            out[t, n] = [np.nan if s is None else s for s in trajectory]
    return out


def task_sums(scores_TNK: np.ndarray, right_at: float = RIGHT_AT) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per task: the sum of scores at each step, the count scored at each step, and the net
    corrections y^0 -> y^K of its trajectories (the sufficient statistics a draw adds up)."""
    scored = ~np.isnan(scores_TNK)
    sums_TK = np.where(scored, scores_TNK, 0.0).sum(axis=1)
    counts_TK = scored.sum(axis=1).astype(float)
    first, last = scores_TNK[:, :, 0], scores_TNK[:, :, -1]
    both = scored[:, :, 0] & scored[:, :, -1]
    up = both & (first < right_at) & (last >= right_at)
    down = both & (first >= right_at) & (last < right_at)
    return sums_TK, counts_TK, (up.sum(axis=1) - down.sum(axis=1)).astype(float)


def task_weights(tasks: int, draws: int, rng: np.random.Generator) -> np.ndarray:
    """``draws x tasks``: how often each task is picked in each draw (rows sum to ``tasks``)."""
    picks = rng.integers(0, tasks, size=(draws, tasks))
    flat = (picks + tasks * np.arange(draws)[:, None]).ravel()
    return np.bincount(flat, minlength=draws * tasks).reshape(draws, tasks).astype(float)


def replicates(scores_TNK: np.ndarray, draws: int, rng: np.random.Generator,
               right_at: float = RIGHT_AT) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap draws over tasks: accuracy ``draws x (K+1)`` (NaN where a draw scored nothing at a
    step) and net corrections ``draws``."""
    sums_TK, counts_TK, net_T = task_sums(scores_TNK, right_at)
    weights_BT = task_weights(len(scores_TNK), draws, rng)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy_BK = (weights_BT @ sums_TK) / (weights_BT @ counts_TK)
    return accuracy_BK, weights_BT @ net_T


def point(scores_TNK: np.ndarray, right_at: float = RIGHT_AT) -> tuple[np.ndarray, float]:
    """The estimates themselves: accuracy by step (NaN: nothing scored) and net corrections."""
    sums_TK, counts_TK, net_T = task_sums(scores_TNK, right_at)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums_TK.sum(axis=0) / counts_TK.sum(axis=0), float(net_T.sum())


def bootstrap(evaluations: Sequence[Scores | np.ndarray], *, draws: int = DRAWS, seed: int = 0,
              right_at: float = RIGHT_AT) -> Intervals:
    """Intervals for one evaluation (``[scores]``) or several seeds' (module docstring).

    Raises ``StatsError`` for no evaluations, an evaluation with fewer than two tasks (one task
    resamples to itself: a zero-width interval that says nothing), or seeds with different K.
    """
    if not evaluations:
        raise StatsError("no evaluations to compute intervals from")
    arrays = [e if isinstance(e, np.ndarray) else as_array(e) for e in evaluations]
    if any(len(a) < 2 for a in arrays):
        raise StatsError("an interval over tasks needs at least two tasks per evaluation")
    if len({a.shape[2] for a in arrays}) != 1:
        raise StatsError("the seeds' evaluations have different numbers of steps")
    rng = np.random.default_rng(seed)
    seeds = len(arrays)
    # stage 1: per picked position j, a fresh task draw for every seed; stage 2 keeps the picked seed's
    per_seed = [[replicates(a, draws, rng, right_at) for a in arrays] for _ in range(seeds)]
    picked_BS = rng.integers(0, seeds, size=(draws, seeds)) if seeds > 1 else np.zeros((draws, 1), dtype=int)
    rows = np.arange(draws)
    accuracy_BK = np.mean([np.stack([per_seed[j][s][0] for s in range(seeds)])[picked_BS[:, j], rows]
                           for j in range(seeds)], axis=0)
    net_B = np.mean([np.stack([per_seed[j][s][1] for s in range(seeds)])[picked_BS[:, j], rows]
                     for j in range(seeds)], axis=0)
    points = [point(a, right_at) for a in arrays]
    accuracy_K = np.mean([p[0] for p in points], axis=0)
    net = float(np.mean([p[1] for p in points]))
    delta_BK = accuracy_BK - accuracy_BK[:, :1]
    return Intervals(
        accuracy_by_step=tuple(_interval(accuracy_K[k], accuracy_BK[:, k]) for k in range(accuracy_K.size)),
        delta_by_step=tuple(_interval(accuracy_K[k] - accuracy_K[0], delta_BK[:, k]) for k in range(accuracy_K.size)),
        net_corrections=_interval(net, net_B) or Interval(net, net, net),
        tasks=sum(len(a) for a in arrays), seeds=seeds, draws=draws)


def _interval(estimate: float, draws_B: np.ndarray) -> Interval | None:
    kept = draws_B[~np.isnan(draws_B)]
    if np.isnan(estimate) or kept.size == 0:
        return None
    tail = 100 * (1 - LEVEL) / 2
    low, high = np.percentile(kept, [tail, 100 - tail])
    return Interval(float(estimate), float(low), float(high))


def half_width_needed(per_task_sd: float, target: float, z: float = 1.96) -> int:
    """Tasks for a 95% half-width of ``target`` when a task's Delta_K has standard deviation
    ``per_task_sd`` (normal approximation: z * sd / sqrt(T) <= target)."""
    if per_task_sd < 0 or target <= 0:
        raise StatsError("the standard deviation must be >= 0 and the target > 0")
    return int(np.ceil((z * per_task_sd / target) ** 2))
