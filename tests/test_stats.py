"""The bootstrap intervals on data whose truth is known (exitagent.stats)."""

from __future__ import annotations

import numpy as np
import pytest

from exitagent import stats


def bernoulli_eval(rng: np.random.Generator, p_T: np.ndarray, q_T: np.ndarray, samples: int) -> np.ndarray:
    """T tasks x n samples x 2 steps: y^0 right with p_t, y^K right with q_t. The two steps of a
    trajectory share one uniform draw, so they are strongly correlated, as a revision of an answer is."""
    u = rng.random((len(p_T), samples))
    return np.stack([(u < p_T[:, None]), (u < q_T[:, None])], axis=2).astype(float)


def test_intervals_cover_the_truth_about_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(1)
    tasks = 100
    p_T = rng.uniform(0.05, 0.95, tasks)  # fixed tasks: the truth is their mean
    q_T = np.clip(p_T + rng.normal(0.03, 0.1, tasks), 0, 1)
    truth_accuracy, truth_delta = p_T.mean(), (q_T - p_T).mean()
    covered_accuracy = covered_delta = 0
    repetitions = 400
    for repetition in range(repetitions):
        # tasks are redrawn too (with replacement from the fixed population), as a new task draw would be
        chosen = rng.integers(0, tasks, tasks)
        result = stats.bootstrap([bernoulli_eval(rng, p_T[chosen], q_T[chosen], 4)], draws=1000, seed=repetition)
        first, delta = result.accuracy_by_step[0], result.delta_k
        assert first is not None and delta is not None
        covered_accuracy += first.low <= truth_accuracy <= first.high
        covered_delta += delta.low <= truth_delta <= delta.high
    assert 0.93 <= covered_accuracy / repetitions <= 0.97
    assert 0.93 <= covered_delta / repetitions <= 0.97


def test_paired_interval_of_a_change_is_narrower_than_unpaired() -> None:
    rng = np.random.default_rng(2)
    p_T = rng.uniform(0, 1, 200)
    scores = bernoulli_eval(rng, p_T, np.clip(p_T + 0.05, 0, 1), 8)
    paired = stats.bootstrap([scores], draws=2000).delta_k
    assert paired is not None
    # unpaired: step 0 and step K resampled with independent task draws
    first, _ = stats.replicates(scores, 2000, np.random.default_rng(3))
    last, _ = stats.replicates(scores, 2000, np.random.default_rng(4))
    unpaired = np.percentile(last[:, -1] - first[:, 0], [2.5, 97.5])
    assert (paired.high - paired.low) < 0.5 * (unpaired[1] - unpaired[0])


def test_estimates_match_the_evaluation_and_net_corrections_count_transitions() -> None:
    # task a: one trajectory wrong -> right, one right -> right; task b: right -> wrong, then a failure
    scores: list[list[list[float | None]]] = [[[0.0, 1.0], [1.0, 1.0]], [[1.0, 0.0], [None, 1.0]]]
    result = stats.bootstrap([scores], draws=500)
    assert [i.estimate for i in result.accuracy_by_step if i] == pytest.approx([2 / 3, 3 / 4])
    assert result.delta_k is not None and result.delta_k.estimate == pytest.approx(3 / 4 - 2 / 3)
    assert result.net_corrections.estimate == 0.0  # one up, one down; the failed y^0 pairs with nothing
    assert result.delta_by_step[0] == stats.Interval(0.0, 0.0, 0.0)


def test_same_scores_same_interval() -> None:
    scores = bernoulli_eval(np.random.default_rng(5), np.full(30, 0.4), np.full(30, 0.5), 2)
    assert stats.bootstrap([scores], seed=7) == stats.bootstrap([scores], seed=7)


def test_all_equal_scores_give_a_zero_width_interval() -> None:
    result = stats.bootstrap([np.ones((10, 3, 5))], draws=200)
    assert all(i == stats.Interval(1.0, 1.0, 1.0) for i in result.accuracy_by_step)
    assert result.delta_k == stats.Interval(0.0, 0.0, 0.0)


@pytest.mark.parametrize(("evaluations", "message"), [
    ([], "no evaluations"),
    ([[]], "no tasks"),
    ([[[[1.0, 0.0]]]], "at least two tasks"),
    ([[[[1.0, 0.0]], [[1.0]]]], "same number of steps"),
    ([np.ones((3, 1, 2)), np.ones((3, 1, 4))], "different numbers of steps"),
])
def test_scores_without_an_interval_are_one_clear_error(evaluations: list, message: str) -> None:
    with pytest.raises(stats.StatsError, match=message):
        stats.bootstrap(evaluations)


def test_a_step_nobody_scored_has_no_interval() -> None:
    scores = np.ones((4, 2, 3))
    scores[:, :, 1] = np.nan
    result = stats.bootstrap([scores], draws=100)
    assert result.accuracy_by_step[1] is None and result.delta_by_step[1] is None
    assert result.accuracy_by_step[2] == stats.Interval(1.0, 1.0, 1.0)


def test_seeds_widen_the_interval_by_their_own_spread() -> None:
    rng = np.random.default_rng(6)
    # three seeds whose policies differ (0.3, 0.5, 0.7 accuracy): the seed spread must show
    seeds = [bernoulli_eval(rng, np.full(200, p), np.full(200, p), 4) for p in (0.3, 0.5, 0.7)]
    pooled = stats.bootstrap(seeds, draws=2000)
    alone = stats.bootstrap(seeds[1:2], draws=2000)
    first, one = pooled.accuracy_by_step[0], alone.accuracy_by_step[0]
    assert first is not None and one is not None
    assert first.estimate == pytest.approx(np.mean([s[:, :, 0].mean() for s in seeds]))
    assert (first.high - first.low) > 4 * (one.high - one.low)
    assert pooled.seeds == 3 and pooled.tasks == 600


def test_tasks_needed_for_a_half_width() -> None:
    assert stats.half_width_needed(0.15, 0.015) == 385  # (1.96 * 0.15 / 0.015)^2 = 384.2
    with pytest.raises(stats.StatsError):
        stats.half_width_needed(0.1, 0.0)
