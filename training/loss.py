"""The GRPO loss (exit-spec.md section 5) and the per-token log-probabilities it needs.

Three policies meet in one update:

- pi_theta, the weights being trained (``logprobs_BT``, with gradient);
- pi_old, the weights before this update. The trainer does one update per batch, so pi_old is
  pi_theta detached unless the caller passes ``old_logprobs_BT`` (several epochs over a batch);
- pi_behaviour, the weights vLLM sampled with, possibly a few versions stale, whose
  log-probabilities were stored with the rollout (``behaviour_logprobs_BT``).

Per trainable token, with A the response's advantage (the TIS form of verl and TRL's
``vllm_importance_sampling_correction``, mode ``token_truncate``):

    ratio  = exp(logp_theta - logp_old)                        (PPO ratio, 1 in value when old = theta)
    w      = min(exp(logp_old - logp_behaviour), C)            (truncated importance weight, detached)
    loss_t = -w * min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) + beta * kl_t
    kl_t   = exp(ref - logp) - (ref - logp) - 1                (k3 estimator of KL(pi_theta || pi_ref))

The clip keeps one update from moving far from pi_old; w corrects for the tokens having been
sampled by pi_behaviour rather than pi_old, truncated at C so one stale token cannot dominate. With
``kl_ratio_weight`` (TRL's ``use_bias_correction_kl``, on by default there) kl_t is multiplied by
the differentiable ratio, which makes its gradient the unbiased reverse-KL gradient.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from training.data import MicroBatch

# --- per-token log-probabilities ----------------------------------------------------------------

# Scored positions x vocabulary up to which the head's logits are kept for the backward pass
# (64 Mi entries: 256 MiB in float32).
KEPT_LOGITS = 64 * 2**20


def _head_logprobs(hidden_NH: torch.Tensor, weight_VH: torch.Tensor, bias_V: torch.Tensor | None,
                   targets_N: torch.Tensor, want_entropy: bool,
                   temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) (and entropy) of N positions: one (N, V) logits block, in float32."""
    logits_NV = F.linear(hidden_NH, weight_VH, bias_V).float() / temperature
    lse_N = torch.logsumexp(logits_NV, dim=-1)
    logprobs_N = logits_NV.gather(-1, targets_N[:, None]).squeeze(-1) - lse_N
    if not want_entropy:
        return logprobs_N, torch.zeros_like(logprobs_N).detach()
    with torch.no_grad():
        entropy_N = lse_N - (torch.softmax(logits_NV, dim=-1) * logits_NV).sum(-1)
    return logprobs_N, entropy_N


def _logits_logprobs(logits_NV: torch.Tensor, targets_N: torch.Tensor,
                     want_entropy: bool, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The fallback's chunk: the logits exist already, only log_softmax is chunked."""
    logits_NV = logits_NV.float() / temperature
    lse_N = torch.logsumexp(logits_NV, dim=-1)
    logprobs_N = logits_NV.gather(-1, targets_N[:, None]).squeeze(-1) - lse_N
    entropy_N = torch.zeros_like(logprobs_N)
    if want_entropy:
        with torch.no_grad():
            entropy_N = lse_N - (torch.softmax(logits_NV, dim=-1) * logits_NV).sum(-1)
    return logprobs_N, entropy_N


def _split_head(model: Any) -> tuple[Any, torch.nn.Linear] | None:
    """(backbone, lm_head) when the model is a plain decoder + linear head, else None.

    Models that scale or soft-cap their logits (Gemma 2, Cohere, Granite...) would give wrong
    log-probabilities through a bare ``lm_head``, so they take the fallback.
    """
    config = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier"):
        if getattr(config, attr, None) not in (None, 1.0):
            return None
    backbone, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if not isinstance(backbone, torch.nn.Module) or not isinstance(head, torch.nn.Linear):
        return None
    return backbone, head


def _hidden_states(backbone: Any, tokens_BT: torch.Tensor, attention_BT: torch.Tensor, prefix_len: int,
                   two_passes: bool = False) -> Any:
    """The backbone's last hidden states; a prefix shared by every row is run once, for one row.

    The prefix's keys and values are repeated to every row and the rest of each row attends to
    them, exactly as if each row had been run whole (the same numbers in float32; tests check it).
    Hugging Face's activation checkpointing silently drops a cache, so it rules sharing out.

    ``two_passes`` (under FSDP): a batch that shares nothing still runs in two passes, its first
    position then the rest, so every micro-batch calls each layer as often as a shared one does:
    each call gathers the layer's shards, and every rank must issue the same collectives.
    """
    rows = tokens_BT.shape[0]
    checkpointed = getattr(backbone, "is_gradient_checkpointing", False)
    shared = prefix_len >= 1 and rows >= 2 and not checkpointed
    if not shared and not (two_passes and not checkpointed and tokens_BT.shape[1] >= 2):
        return backbone(input_ids=tokens_BT, attention_mask=attention_BT, use_cache=False).last_hidden_state
    from transformers import DynamicCache  # only the shared path needs it

    cache = DynamicCache(config=backbone.config)
    split, head_rows = (prefix_len, 1) if shared else (1, rows)
    head = backbone(input_ids=tokens_BT[:head_rows, :split], attention_mask=attention_BT[:head_rows, :split],
                    past_key_values=cache, use_cache=True)
    if shared:
        cache.batch_repeat_interleave(rows)  # differentiable: gradients flow back into the one prefix run
    tail = backbone(input_ids=tokens_BT[:, split:], attention_mask=attention_BT, past_key_values=cache,
                    use_cache=True).last_hidden_state
    return torch.cat([head.last_hidden_state.expand(rows, -1, -1), tail], dim=1)


def token_logprobs(
    model: Any,
    tokens_BT: torch.Tensor,
    attention_BT: torch.Tensor,
    *,
    score_BT: torch.Tensor | None = None,
    chunk: int = 256,
    return_entropy: bool = False,
    temperature: float = 1.0,
    prefix_len: int = 0,
    two_passes: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(tokens[b, t] | tokens[b, :t]) for every position, aligned with ``tokens_BT``.

    ``temperature`` divides the logits: the policy whose log-probabilities these are is the one the
    samples were drawn from (vLLM reports them the same way with ``--logprobs-mode
    processed_logprobs``, which ``exitagent.serve`` sets).

    Returns ``(logprobs_BT, entropy_BT or None)`` in float32; position 0 (no context) and positions
    outside ``score_BT`` (default: every real token) are 0.0. Pass the loss mask as ``score_BT`` to
    skip the vocabulary projection of prompt and tool tokens altogether.

    Memory: the backbone's hidden states are projected through ``lm_head`` ``chunk`` positions at a
    time, so the (B, T, V) logits never exist; when the scored positions' logits would pass
    ``KEPT_LOGITS``, each chunk runs under activation checkpointing and the backward pass
    recomputes one chunk's logits at a time. Models with no ``.model``/``.lm_head`` pair fall back
    to their full logits, with only log_softmax chunked.

    ``prefix_len``: the first ``prefix_len`` tokens are the same in every row (a group's prompt);
    they are run through the backbone once (``_hidden_states``). Scores there must be off.
    ``two_passes``: see ``_hidden_states`` (the sharded policy sets it).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    score_BT = attention_BT.bool() if score_BT is None else score_BT.bool() & attention_BT.bool()
    # Hidden state t predicts token t + 1: score positions 1.. from hidden states ..T-1.
    picked_BT = score_BT[:, 1:]
    targets_N = tokens_BT[:, 1:][picked_BT]
    parts = _split_head(model)
    if parts is not None:
        backbone, head = parts
        hidden_BTH = _hidden_states(backbone, tokens_BT, attention_BT, prefix_len, two_passes)
        inputs_N = hidden_BTH[:, :-1][picked_BT]

        # Few positions: keeping their logits for the backward pass costs less memory than the
        # activations already kept, and saves recomputing every chunk's projection (a 40 x 110 step:
        # 11.3 s instead of 13.5 s, benchmarks/trainer.py).
        recompute = len(targets_N) * head.weight.shape[0] > KEPT_LOGITS

        def run(lo: int, hi: int) -> Any:
            args = (inputs_N[lo:hi], head.weight, head.bias, targets_N[lo:hi], return_entropy, temperature)
            return checkpoint(_head_logprobs, *args, use_reentrant=False) if recompute else _head_logprobs(*args)
    else:
        logits_BTV = model(input_ids=tokens_BT, attention_mask=attention_BT).logits
        inputs_N = logits_BTV[:, :-1][picked_BT]

        def run(lo: int, hi: int) -> Any:
            return checkpoint(_logits_logprobs, inputs_N[lo:hi], targets_N[lo:hi], return_entropy, temperature,
                              use_reentrant=False)

    pieces = [run(lo, min(lo + chunk, len(targets_N))) for lo in range(0, len(targets_N), chunk)]
    if not pieces:
        # Nothing to score (e.g. every response filtered out): stay connected to the model so
        # backward() still works and gives zero gradients.
        empty_N = inputs_N.float().sum() * 0.0 + inputs_N.new_zeros(0, dtype=torch.float32)
        pieces = [(empty_N, empty_N.detach())]
    logprobs_BT = _scatter(torch.cat([p[0] for p in pieces]), score_BT)
    entropy_BT = _scatter(torch.cat([p[1] for p in pieces]), score_BT) if return_entropy else None
    return logprobs_BT, entropy_BT


def _scatter(values_N: torch.Tensor, score_BT: torch.Tensor) -> torch.Tensor:
    """Place per-position values back at [b, t + 1]; masked_scatter keeps the autograd graph."""
    out_BT = values_N.new_zeros(score_BT.shape)
    shifted_BT = torch.zeros_like(score_BT)
    shifted_BT[:, 1:] = score_BT[:, 1:]
    return out_BT.masked_scatter(shifted_BT, values_N)


# --- the loss ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossConfig:
    """GRPO loss settings. Defaults: exit-spec section 5 (eps 0.2, C = 2, per-token averaging)."""

    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    is_cap: float = 2.0  # C in min(pi_old / pi_behaviour, C)
    beta: float = 0.0  # KL coefficient (math: 0.001)
    aggregation: Literal["token", "sequence"] = "token"
    kl_ratio_weight: bool = True  # TRL's use_bias_correction_kl
    drop_truncated: bool = False  # leave responses that hit their token limit out of the loss
    drop_unparseable: bool = False  # leave responses with no extractable answer out of the loss
    temperature: float = 1.0  # the sampling temperature of the stored responses

    def __post_init__(self) -> None:
        if self.aggregation not in ("token", "sequence"):
            raise ValueError(f"aggregation must be 'token' or 'sequence', got {self.aggregation!r}")
        if (self.is_cap <= 0 or self.beta < 0 or self.temperature <= 0 or not 0 <= self.epsilon_low < 1
                or self.epsilon_high < 0):
            raise ValueError(f"invalid loss settings: {self}")


def grpo_loss(
    logprobs_BT: torch.Tensor,
    behaviour_logprobs_BT: torch.Tensor,
    advantages_B: torch.Tensor,
    mask_BT: torch.Tensor,
    config: LossConfig,
    *,
    old_logprobs_BT: torch.Tensor | None = None,
    ref_logprobs_BT: torch.Tensor | None = None,
    entropy_BT: torch.Tensor | None = None,
    normaliser: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The scalar loss of one micro-batch and its metrics (see the module docstring for the math).

    ``normaliser`` is what the summed loss is divided by: for ``aggregation="token"`` the number of
    trainable tokens, for ``"sequence"`` the number of sequences, in the *whole update* when it is
    split into micro-batches (``loss_normaliser``), so accumulated gradients equal one big batch's.
    Left None, this micro-batch's own count is used. The KL term is added only when
    ``config.beta > 0`` and ``ref_logprobs_BT`` is given.
    """
    mask_BT = mask_BT.to(logprobs_BT.dtype)
    old_BT = logprobs_BT.detach() if old_logprobs_BT is None else old_logprobs_BT.to(logprobs_BT.dtype)
    adv_B1 = advantages_B.to(logprobs_BT.dtype)[:, None]
    ratio_BT = torch.exp(logprobs_BT - old_BT)
    clipped_BT = ratio_BT.clamp(1 - config.epsilon_low, 1 + config.epsilon_high)
    policy_BT = -torch.min(ratio_BT * adv_B1, clipped_BT * adv_B1)
    # Multiply by the mask before exp: off the mask the stored logprob is 0.0 and exp could overflow.
    raw_weight_BT = torch.exp((old_BT - behaviour_logprobs_BT) * mask_BT).detach()
    weight_BT = raw_weight_BT.clamp(max=config.is_cap)
    per_token_BT = policy_BT * weight_BT
    kl_BT = None
    if config.beta > 0 and ref_logprobs_BT is not None:
        delta_BT = ref_logprobs_BT - logprobs_BT
        kl_BT = torch.exp(delta_BT) - delta_BT - 1
        kl_term_BT = kl_BT * ratio_BT if config.kl_ratio_weight else kl_BT
        per_token_BT = per_token_BT + config.beta * kl_term_BT
    loss = _aggregate(per_token_BT, mask_BT, config.aggregation, normaliser)
    stats = _Stats(mask_BT, advantages_B, ratio_BT, raw_weight_BT, config)
    metrics = stats.metrics(kl_BT, entropy_BT, old_BT - behaviour_logprobs_BT)
    metrics["loss"] = float(loss.detach())
    return loss, metrics


def _aggregate(per_token_BT: torch.Tensor, mask_BT: torch.Tensor, how: str, normaliser: float | None) -> torch.Tensor:
    if how == "token":
        denominator = float(mask_BT.sum()) if normaliser is None else normaliser
        return (per_token_BT * mask_BT).sum() / max(denominator, 1.0)
    counts_B = mask_BT.sum(-1)
    per_sequence_B = (per_token_BT * mask_BT).sum(-1) / counts_B.clamp(min=1.0)
    # Sequences with no trainable token (filtered out) are not counted in the mean.
    denominator = float((counts_B > 0).sum()) if normaliser is None else normaliser
    return per_sequence_B.sum() / max(denominator, 1.0)


class _Stats:
    """Masked means of the quantities a run watches; floats, computed without gradient."""

    def __init__(self, mask_BT: torch.Tensor, advantages_B: torch.Tensor, ratio_BT: torch.Tensor,
                 raw_weight_BT: torch.Tensor, config: LossConfig) -> None:
        self.mask = mask_BT.detach().bool()
        self.adv_BT = advantages_B.detach()[:, None].expand_as(self.mask)
        self.ratio = ratio_BT.detach()
        self.raw_weight = raw_weight_BT
        self.config = config

    def mean(self, x_BT: torch.Tensor) -> float:
        return float(x_BT.detach().float()[self.mask].mean()) if self.mask.any() else 0.0

    def metrics(self, kl_BT: torch.Tensor | None, entropy_BT: torch.Tensor | None,
                old_minus_behaviour_BT: torch.Tensor) -> dict[str, float]:
        c, low, high = self.config, 1 - self.config.epsilon_low, 1 + self.config.epsilon_high
        weights = self.raw_weight[self.mask]
        advantages = self.adv_BT[:, 0] if self.adv_BT.numel() else self.adv_BT.new_zeros(0)
        out = {
            "tokens": float(self.mask.sum()),
            # As TRL: a token counts as clipped only where the clip removes its gradient.
            "clip_low_frac": self.mean((self.ratio < low) & (self.adv_BT < 0)),
            "clip_high_frac": self.mean((self.ratio > high) & (self.adv_BT > 0)),
            "ratio_deviation_mean": self.mean((self.ratio - 1).abs()),  # 0 unless pi_old is an earlier epoch's
            "is_weight_mean": self.mean(self.raw_weight.clamp(max=c.is_cap)),
            "is_weight_max": float(weights.max()) if weights.numel() else 0.0,
            "is_truncated_frac": self.mean(self.raw_weight > c.is_cap),
            "behaviour_logprob_diff_mean": self.mean(old_minus_behaviour_BT.abs()),
            "advantage_mean": float(advantages.mean()) if advantages.numel() else 0.0,
            "advantage_std": float(advantages.std()) if advantages.numel() > 1 else 0.0,
            "advantage_min": float(advantages.min()) if advantages.numel() else 0.0,
            "advantage_max": float(advantages.max()) if advantages.numel() else 0.0,
        }
        if kl_BT is not None:
            out["kl"] = self.mean(kl_BT)
        if entropy_BT is not None:
            out["entropy"] = self.mean(entropy_BT)
        return out


# --- filtering, normalisers, one micro-batch end to end -----------------------------------------


def effective_mask(batch: MicroBatch, config: LossConfig) -> torch.Tensor:
    """The loss mask after the optional filters: dropped responses get an all-zero row."""
    keep_B = torch.ones_like(batch.truncated_B)
    if config.drop_truncated:
        keep_B &= ~batch.truncated_B
    if config.drop_unparseable:
        keep_B &= ~batch.unparseable_B
    return batch.mask_BT * keep_B[:, None].to(batch.mask_BT.dtype)


def loss_normaliser(batches: Sequence[MicroBatch], config: LossConfig) -> float:
    """The count ``grpo_loss`` divides by when these micro-batches make one update (after filtering)."""
    masks = [effective_mask(batch, config) for batch in batches]
    if config.aggregation == "token":
        return float(sum(float(m.sum()) for m in masks))
    return float(sum(int((m.sum(-1) > 0).sum()) for m in masks))


def _logprobs_of(model: Any) -> Any:
    """``token_logprobs`` bound to ``model``; a sharded policy (``training.distributed.Policy``) has its
    own, run as an FSDP forward so the head's weight is gathered while the chunks read it."""
    return getattr(model, "token_logprobs", None) or functools.partial(token_logprobs, model)


def micro_batch_loss(
    model: Any,
    batch: MicroBatch,
    config: LossConfig,
    *,
    ref_model: Any = None,
    old_logprobs_BT: torch.Tensor | None = None,
    normaliser: float | None = None,
    chunk: int = 256,
    return_entropy: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Log-probabilities of ``model`` (and ``ref_model`` when beta > 0) on ``batch``, then the loss.

    The caller calls ``backward()`` on the returned loss, once per micro-batch, and steps the
    optimiser after the last one, passing the same ``loss_normaliser(batches, config)`` to each.
    For several epochs over one batch, compute ``old_logprobs_BT`` once before the first update
    (``token_logprobs`` under ``torch.no_grad()``) and pass it on every epoch; otherwise the PPO
    ratio is 1 and only the IS weight corrects off-policyness.
    """
    device = next(model.parameters()).device
    tokens_BT, attention_BT = batch.tokens_BT.to(device), batch.attention_BT.to(device)
    mask_BT = effective_mask(batch, config).to(device)
    logprobs_BT, entropy_BT = _logprobs_of(model)(tokens_BT, attention_BT, score_BT=mask_BT > 0,
                                                  chunk=chunk, return_entropy=return_entropy,
                                                  temperature=config.temperature, prefix_len=batch.prefix_len)
    ref_BT = None
    if config.beta > 0 and ref_model is not None:
        with torch.no_grad():
            ref_BT, _ = _logprobs_of(ref_model)(tokens_BT, attention_BT, score_BT=mask_BT > 0, chunk=chunk,
                                                temperature=config.temperature, prefix_len=batch.prefix_len)
    return grpo_loss(logprobs_BT, batch.behaviour_logprobs_BT.to(device), batch.advantages_B.to(device),
                     mask_BT, config, old_logprobs_BT=None if old_logprobs_BT is None else old_logprobs_BT.to(device),
                     ref_logprobs_BT=ref_BT, entropy_BT=entropy_BT, normaliser=normaliser)


@torch.no_grad()
def old_logprobs(model: Any, batch: MicroBatch, config: LossConfig, *, chunk: int = 256) -> torch.Tensor:
    """pi_old on ``batch``: the log-probabilities before the first epoch, kept for every epoch."""
    device = next(model.parameters()).device
    tokens_BT, attention_BT = batch.tokens_BT.to(device), batch.attention_BT.to(device)
    mask_BT = effective_mask(batch, config).to(device)
    logprobs_BT, _ = _logprobs_of(model)(tokens_BT, attention_BT, score_BT=mask_BT > 0, chunk=chunk,
                                         temperature=config.temperature, prefix_len=batch.prefix_len)
    return logprobs_BT.detach()


# --- the reference policy ------------------------------------------------------------------------


def reference_due(updates_done: int, every: int) -> bool:
    """True after every ``every``-th update (exit-spec: M = 100); never for ``every`` <= 0."""
    return every > 0 and updates_done > 0 and updates_done % every == 0


@torch.no_grad()
def refresh_reference(policy: torch.nn.Module, reference: torch.nn.Module, alpha: float = 1.0) -> None:
    """theta_ref <- alpha * theta + (1 - alpha) * theta_ref, in place (alpha = 1 copies)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    policy_params = dict(policy.named_parameters())
    for name, ref_param in reference.named_parameters():
        source = policy_params[name].detach().to(ref_param.dtype)
        if alpha == 1.0:
            ref_param.copy_(source)
        else:
            ref_param.lerp_(source, alpha)
