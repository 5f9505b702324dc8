"""Group-relative advantages and the diversity bonus (exit-spec.md sections 4 and 5).

A group is the G responses sampled from one prompt. Each response's advantage is its reward
relative to its group, the same value for every token of the response:

    A_i = (r_i - mean(r)) / (std(r) + eps)          (``scale_by_std=False``: Dr. GRPO, no division)

A group whose rewards are all equal carries no signal and gets all-zero advantages. Full ExIt then
multiplies A_i by the diversity multiplier d_i of response i (computed at collection time by
``exitagent.diversity`` and stored with the rollout).

Pure torch, no I/O: the caller passes rewards and embeddings, and gets tensors back.
"""

from __future__ import annotations

import numpy.typing as npt
import torch

# TRL's GRPOTrainer adds 1e-4 to the group std; using the same value keeps the peer check exact.
DEFAULT_EPS = 1e-4


def group_advantages(
    rewards_G: torch.Tensor | npt.ArrayLike,
    *,
    scale_by_std: bool = True,
    eps: float = DEFAULT_EPS,
    multipliers_G: torch.Tensor | npt.ArrayLike | None = None,
) -> torch.Tensor:
    """Advantages of one group of G responses, shape (G,), float32.

    ``std`` is the sample standard deviation (Bessel-corrected, as ``torch.std`` and TRL). A
    zero-variance group (including a group of one) returns zeros, before multipliers: exact zeros,
    not the rounding noise of ``(r - mean) / eps``. ``multipliers_G`` (the diversity bonus) scales
    each response's advantage when given.
    """
    rewards_G = torch.as_tensor(rewards_G, dtype=torch.float32)
    if rewards_G.ndim != 1 or rewards_G.numel() == 0:
        raise ValueError(f"rewards_G must be a non-empty 1-D tensor, got shape {tuple(rewards_G.shape)}")
    if not torch.isfinite(rewards_G).all():
        raise ValueError(f"rewards_G must be finite (drop failed evaluations first), got {rewards_G.tolist()}")
    if bool((rewards_G == rewards_G[0]).all()):
        return torch.zeros_like(rewards_G)
    advantages_G = rewards_G - rewards_G.mean()
    if scale_by_std:
        advantages_G = advantages_G / (rewards_G.std() + eps)
    if multipliers_G is not None:
        multipliers_G = torch.as_tensor(multipliers_G, dtype=torch.float32)
        if multipliers_G.shape != rewards_G.shape:
            raise ValueError(
                f"multipliers_G has shape {tuple(multipliers_G.shape)}, rewards_G {tuple(rewards_G.shape)}"
            )
        advantages_G = advantages_G * multipliers_G
    return advantages_G
