"""The GRPO loss: chunked log-probabilities, clipping, the IS cap, KL, aggregation, filters, reference."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import training.loss as loss_module
from training.data import TrainItem, make_micro_batches
from training.loss import (
    LossConfig,
    effective_mask,
    grpo_loss,
    loss_normaliser,
    micro_batch_loss,
    reference_due,
    refresh_reference,
    token_logprobs,
)


def _unchunked(model, tokens_BT, attention_BT):
    logits_BTV = model(input_ids=tokens_BT, attention_mask=attention_BT).logits.float()
    picked = torch.log_softmax(logits_BTV[:, :-1], -1).gather(-1, tokens_BT[:, 1:, None]).squeeze(-1)
    out_BT = torch.zeros(tokens_BT.shape)
    out_BT[:, 1:] = picked * attention_BT[:, 1:]
    return out_BT


class _LogitsOnly(torch.nn.Module):
    """A model without the .model/.lm_head pair: token_logprobs must fall back to its logits."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, **kwargs):
        return self.inner(**kwargs)


def _batch(tiny_model):
    torch.manual_seed(1)
    tokens_BT = torch.randint(3, 1000, (3, 21))
    attention_BT = torch.ones_like(tokens_BT)
    attention_BT[1, 12:] = 0
    attention_BT[2, 17:] = 0
    return tokens_BT, attention_BT


@pytest.mark.parametrize("kept_logits", [0, 2**30], ids=["recomputed", "kept"])  # the head's two paths
@pytest.mark.parametrize("chunk", [1, 7, 40, 4096])
def test_chunked_logprobs_equal_unchunked_values_and_gradients(tiny_model, chunk, kept_logits,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loss_module, "KEPT_LOGITS", kept_logits)
    tokens_BT, attention_BT = _batch(tiny_model)
    expected_BT = _unchunked(tiny_model, tokens_BT, attention_BT)
    weights_BT = torch.randn(tokens_BT.shape)
    (expected_BT * weights_BT).sum().backward()
    expected_grads = {n: p.grad.clone() for n, p in tiny_model.named_parameters()}
    tiny_model.zero_grad()
    for model in (tiny_model, _LogitsOnly(tiny_model)):
        logprobs_BT, entropy_BT = token_logprobs(model, tokens_BT, attention_BT, chunk=chunk, return_entropy=True)
        assert torch.allclose(logprobs_BT, expected_BT, atol=1e-5)
        (logprobs_BT * weights_BT).sum().backward()
        for name, param in tiny_model.named_parameters():
            assert torch.allclose(param.grad, expected_grads[name], atol=1e-5, rtol=1e-4), name
        tiny_model.zero_grad()
        assert entropy_BT is not None and (entropy_BT[:, 1:][attention_BT[:, 1:] == 1] > 0).all()


def test_score_mask_limits_the_positions_computed(tiny_model) -> None:
    tokens_BT, attention_BT = _batch(tiny_model)
    score_BT = torch.zeros_like(attention_BT, dtype=torch.bool)
    score_BT[:, 8:15] = True
    logprobs_BT, _ = token_logprobs(tiny_model, tokens_BT, attention_BT, score_BT=score_BT, chunk=5)
    expected_BT = _unchunked(tiny_model, tokens_BT, attention_BT)
    keep_BT = score_BT & attention_BT.bool()
    assert torch.allclose(logprobs_BT[keep_BT], expected_BT[keep_BT], atol=1e-5)
    assert (logprobs_BT[~keep_BT] == 0).all()
    # Nothing to score still gives a loss that backward() accepts, with zero gradients.
    empty_BT, _ = token_logprobs(tiny_model, tokens_BT, attention_BT, score_BT=torch.zeros_like(score_BT))
    empty_BT.sum().backward()
    assert all(float(p.grad.abs().sum()) == 0 for p in tiny_model.parameters() if p.grad is not None)


def _one_token(ratio: float, advantage: float, *, behaviour_shift: float = 0.0):
    """Loss and d loss / d logp for one trainable token with pi/pi_old = ratio."""
    logprobs_BT = torch.tensor([[-1.0]], requires_grad=True)
    old_BT = torch.tensor([[-1.0 - math.log(ratio)]])
    behaviour_BT = old_BT - behaviour_shift  # pi_old / pi_behaviour = exp(behaviour_shift)
    loss, metrics = grpo_loss(logprobs_BT, behaviour_BT, torch.tensor([advantage]), torch.ones(1, 1), LossConfig(),
                              old_logprobs_BT=old_BT)
    (grad_BT,) = torch.autograd.grad(loss, logprobs_BT)
    return float(loss.detach()), float(grad_BT), metrics


@pytest.mark.parametrize(
    ("ratio", "advantage", "clipped"),
    [
        (1.5, 1.0, True),  # pushed up past 1 + eps: no further push up
        (0.5, 1.0, False),  # below 1 - eps with A > 0: the min keeps the unclipped term, still pushed up
        (0.5, -1.0, True),  # pushed down past 1 - eps: no further push down
        (1.5, -1.0, False),  # above 1 + eps with A < 0: still pushed down
        (1.1, 1.0, False),
        (0.9, -1.0, False),
    ],
)
def test_clip_zeroes_the_gradient_only_in_the_direction_of_the_advantage(ratio, advantage, clipped) -> None:
    loss, grad, metrics = _one_token(ratio, advantage)
    if clipped:
        assert grad == 0.0
        assert loss == pytest.approx(-advantage * (1.2 if ratio > 1 else 0.8))
        assert metrics["clip_high_frac" if advantage > 0 else "clip_low_frac"] == 1.0
    else:
        # d/dlogp of -ratio * A is -ratio * A: descending it raises logp when A > 0.
        assert grad == pytest.approx(-ratio * advantage, rel=1e-5)
        assert metrics["clip_high_frac"] == metrics["clip_low_frac"] == 0.0


@pytest.mark.parametrize(("shift", "weight"), [(math.log(1.5), 1.5), (math.log(5.0), 2.0), (-2.0, math.exp(-2.0))])
def test_importance_weight_is_truncated_at_c(shift, weight) -> None:
    loss, grad, metrics = _one_token(1.0, 1.0, behaviour_shift=shift)
    assert loss == pytest.approx(-weight, rel=1e-5)
    assert grad == pytest.approx(-weight, rel=1e-5)
    assert metrics["is_weight_mean"] == pytest.approx(weight, rel=1e-5)
    assert metrics["is_weight_max"] == pytest.approx(math.exp(shift), rel=1e-5)
    assert metrics["is_truncated_frac"] == (1.0 if math.exp(shift) > 2.0 else 0.0)


def test_kl_is_non_negative_zero_at_equality_and_has_the_reverse_kl_gradient() -> None:
    torch.manual_seed(0)
    logprobs_BT = (-torch.rand(4, 6) * 3).requires_grad_()
    ref_BT = -torch.rand(4, 6) * 3
    mask_BT, zeros_B = torch.ones(4, 6), torch.zeros(4)  # zero advantages: only the KL term is left
    for kl_ratio_weight in (True, False):
        config = LossConfig(beta=0.5, kl_ratio_weight=kl_ratio_weight)
        loss, metrics = grpo_loss(logprobs_BT, logprobs_BT.detach(), zeros_B, mask_BT, config, ref_logprobs_BT=ref_BT)
        assert metrics["kl"] > 0 and float(loss) == pytest.approx(0.5 * metrics["kl"], rel=1e-5)
        (grad_BT,) = torch.autograd.grad(loss, logprobs_BT)
        delta_BT = (ref_BT - logprobs_BT).detach()
        # With the ratio weight: grad of KL(pi||ref) = E[(logp - ref) d logp]; without: k3's own gradient.
        expected_BT = -delta_BT if kl_ratio_weight else 1 - torch.exp(delta_BT)
        assert torch.allclose(grad_BT, 0.5 * expected_BT / 24, atol=1e-6)
        same, same_metrics = grpo_loss(logprobs_BT, logprobs_BT.detach(), zeros_B, mask_BT, config,
                                       ref_logprobs_BT=logprobs_BT.detach())
        assert float(same) == 0.0 and same_metrics["kl"] == 0.0
    no_kl, no_kl_metrics = grpo_loss(logprobs_BT, logprobs_BT.detach(), zeros_B, mask_BT, LossConfig(beta=0.0),
                                     ref_logprobs_BT=ref_BT)
    assert float(no_kl) == 0.0 and "kl" not in no_kl_metrics


def test_token_and_sequence_averaging() -> None:
    # Sequence 0: 1 trainable token, sequence 1: 3. On-policy, so each token's loss is -A.
    mask_BT = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0]])
    logprobs_BT = torch.full((2, 4), -1.0)
    advantages_B = torch.tensor([2.0, -1.0])
    by_token, _ = grpo_loss(logprobs_BT, logprobs_BT * mask_BT, advantages_B, mask_BT, LossConfig())
    by_sequence, _ = grpo_loss(logprobs_BT, logprobs_BT * mask_BT, advantages_B, mask_BT,
                               LossConfig(aggregation="sequence"))
    assert float(by_token) == pytest.approx((-2.0 + 3 * 1.0) / 4)
    assert float(by_sequence) == pytest.approx((-2.0 + 1.0) / 2)
    halved, _ = grpo_loss(logprobs_BT, logprobs_BT * mask_BT, advantages_B, mask_BT, LossConfig(), normaliser=8.0)
    assert float(halved) == pytest.approx(float(by_token) / 2)


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_micro_batches_accumulate_to_the_full_batch_gradient(tiny_model, make_sequence, aggregation) -> None:
    items = [TrainItem(make_sequence(4, n), adv, truncated=(n == 9)) for n, adv in
             [(3, 1.0), (9, -0.5), (5, 0.7), (12, -1.2), (4, 0.0), (7, 2.0)]]
    config = LossConfig(aggregation=aggregation, drop_truncated=True)
    grads = []
    for budget in (10_000, 24):
        batches = make_micro_batches(items, vocab_size=1000, token_budget=budget)
        normaliser = loss_normaliser(batches, config)
        assert normaliser == (3 + 5 + 12 + 4 + 7 if aggregation == "token" else 5)  # the 9 is truncated
        tiny_model.zero_grad()
        for batch in batches:
            loss, _ = micro_batch_loss(tiny_model, batch, config, normaliser=normaliser, chunk=8)
            loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in tiny_model.parameters()]))
    assert len(make_micro_batches(items, vocab_size=1000, token_budget=24)) > 2
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_filters_zero_the_rows_of_dropped_responses(make_sequence) -> None:
    items = [TrainItem(make_sequence(2, 3), 1.0, truncated=True), TrainItem(make_sequence(2, 4), 1.0, unparseable=True),
             TrainItem(make_sequence(2, 5), 1.0)]
    (batch,) = make_micro_batches(items, vocab_size=1000)
    kept = {cfg: effective_mask(batch, LossConfig(drop_truncated=cfg[0], drop_unparseable=cfg[1])).sum(-1).tolist()
            for cfg in [(False, False), (True, False), (False, True), (True, True)]}
    assert kept == {(False, False): [3, 4, 5], (True, False): [0, 4, 5], (False, True): [3, 0, 5],
                    (True, True): [0, 0, 5]}


def test_reference_refresh(tiny_model) -> None:
    reference = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for param in tiny_model.parameters():
            param.add_(1.0)
    before = [p.clone() for p in reference.parameters()]
    refresh_reference(tiny_model, reference, alpha=0.5)
    for old, ref, new in zip(before, reference.parameters(), tiny_model.parameters(), strict=True):
        assert torch.allclose(ref, (old + new) / 2, atol=1e-6)
    refresh_reference(tiny_model, reference, alpha=1.0)
    assert all(torch.equal(r, p) for r, p in zip(reference.parameters(), tiny_model.parameters(), strict=True))
    assert [n for n in range(1, 301) if reference_due(n, 100)] == [100, 200, 300]
    assert not reference_due(0, 100) and not reference_due(5, 0)
    with pytest.raises(ValueError):
        refresh_reference(tiny_model, reference, alpha=1.5)


def test_old_logprobs_from_an_earlier_epoch_reach_the_clip(tiny_model, make_sequence) -> None:
    (batch,) = make_micro_batches([(make_sequence(3, 5), 1.0), (make_sequence(3, 6), 2.0)], vocab_size=1000)
    with torch.no_grad():
        current_BT, _ = token_logprobs(tiny_model, batch.tokens_BT, batch.attention_BT, score_BT=batch.mask_BT > 0)
    # pi / pi_old = 1.5 everywhere, A > 0: every token is clipped and nothing moves the model.
    loss, metrics = micro_batch_loss(tiny_model, batch, LossConfig(), old_logprobs_BT=current_BT - math.log(1.5))
    loss.backward()
    assert metrics["clip_high_frac"] == 1.0
    assert all(float(p.grad.abs().sum()) == 0 for p in tiny_model.parameters() if p.grad is not None)


def test_temperature_scales_the_logits_before_the_softmax(tiny_model) -> None:
    tokens_BT = torch.randint(0, tiny_model.config.vocab_size, (2, 7))
    attention_BT = torch.ones_like(tokens_BT)
    with torch.no_grad():
        hot, _ = token_logprobs(tiny_model, tokens_BT, attention_BT, temperature=0.5)
        logits_BTV = tiny_model(input_ids=tokens_BT).logits.float() / 0.5
        cold, _ = token_logprobs(tiny_model, tokens_BT, attention_BT)
    expected = torch.log_softmax(logits_BTV[:, :-1], -1).gather(-1, tokens_BT[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(hot[:, 1:], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(hot, cold)
