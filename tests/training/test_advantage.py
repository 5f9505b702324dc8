"""Group-relative advantages and the diversity multipliers (exit-spec sections 4 and 5)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.advantage import diversity_multipliers, group_advantages


def test_zero_variance_group_gives_exact_zeros() -> None:
    # 0.1 + 0.2 style rewards whose mean is not exactly representable must still give exact zeros.
    for rewards in ([1.0, 1.0, 1.0, 1.0], [0.0] * 8, [0.3] * 3, [0.7]):
        advantages_G = group_advantages(rewards, multipliers_G=[2.0] * len(rewards))
        assert torch.equal(advantages_G, torch.zeros(len(rewards)))


def test_std_scaling_on_matches_formula() -> None:
    rewards_G = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    advantages_G = group_advantages(rewards_G, eps=0.0)
    expected = (rewards_G - 0.375) / rewards_G.std()
    assert torch.allclose(advantages_G, expected)
    assert abs(float(advantages_G.mean())) < 1e-6
    assert float(advantages_G.std()) == pytest.approx(1.0, abs=1e-6)
    # With the default eps the magnitude is slightly smaller, never larger.
    assert (group_advantages(rewards_G).abs() < advantages_G.abs()).all()


def test_std_scaling_off_is_dr_grpo() -> None:
    advantages_G = group_advantages([0.2, 0.4, 0.9], scale_by_std=False)
    assert torch.allclose(advantages_G, torch.tensor([-0.3, -0.1, 0.4]), atol=1e-6)


def test_multipliers_scale_each_response() -> None:
    plain_G = group_advantages([1.0, 0.0, 0.5, 0.0])
    scaled_G = group_advantages([1.0, 0.0, 0.5, 0.0], multipliers_G=[2.0, 0.5, 1.0, 3.0])
    assert torch.allclose(scaled_G, plain_G * torch.tensor([2.0, 0.5, 1.0, 3.0]))
    with pytest.raises(ValueError, match="shape"):
        group_advantages([1.0, 0.0], multipliers_G=[1.0])


def test_bad_rewards_are_rejected() -> None:
    with pytest.raises(ValueError, match="finite"):
        group_advantages([1.0, float("nan")])
    with pytest.raises(ValueError, match="non-empty"):
        group_advantages([])


def test_diversity_multipliers_distance_over_range() -> None:
    # Centroid at the origin; distances 1, 1, 3, 3 -> range 2 -> d = 0.5, 0.5, 1.5, 1.5.
    embeddings_GD = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 3.0], [0.0, -3.0]])
    d_G = diversity_multipliers(embeddings_GD)
    assert torch.allclose(d_G, torch.tensor([0.5, 0.5, 1.5, 1.5]))
    # The farthest response gets the largest bonus, whatever the layout.
    rng = np.random.default_rng(0)
    cloud = rng.normal(size=(6, 16))
    d_G = diversity_multipliers(torch.tensor(cloud))
    distances = np.linalg.norm(cloud - cloud.mean(0), axis=1)
    assert int(d_G.argmax()) == int(distances.argmax())
    assert math.isclose(float(d_G.max() - d_G.min()), 1.0, rel_tol=1e-5)


def test_diversity_range_zero_gives_ones() -> None:
    square_GD = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])  # all equidistant
    assert torch.equal(diversity_multipliers(square_GD), torch.ones(4))
    assert torch.equal(diversity_multipliers(torch.ones(3, 5)), torch.ones(3))  # identical responses
    assert torch.equal(diversity_multipliers([[0.2, 0.1]]), torch.ones(1))  # a group of one
