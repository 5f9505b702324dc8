"""Group-relative advantages (exit-spec section 5); the diversity multipliers are tested in test_diversity."""

from __future__ import annotations

import pytest
import torch

from training.advantage import group_advantages


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
