"""Tool use's overlong filtering: the checker marks a rollout that made no valid call where one was
needed, and with --drop-unparseable that rollout carries zero weight in the loss (no gradient)."""

from __future__ import annotations

import torch

from evaluators.tool_use import CallRecord, score_record
from evaluators.worlds.bfcl.env import get_entry
from exitagent.types import PolicyVersion, StepKind, StoredGroup, StoredRollout, Variant
from training.config import UpdateConfig
from training.data import TrainItem, make_micro_batches
from training.loss import LossConfig, effective_mask, micro_batch_loss
from training.update import items_from


def test_the_checker_marks_a_missing_action_and_nothing_else() -> None:
    entry = get_entry("multi_turn_base_0")
    assert score_record(CallRecord(entry.id, ((),))).components["unparseable"] == 1.0  # no call: no action
    assert score_record(CallRecord(entry.id, entry.ground_truth[:1])).components["unparseable"] == 0.0
    wrong = score_record(CallRecord(entry.id, (("ls()",),)))  # a valid action that is wrong: trained on
    assert wrong.total == 0.0 and wrong.components["unparseable"] == 0.0
    irrelevant = get_entry("multi_turn_base_180")  # requests 3 and 4 cannot be done: no call is right there
    assert score_record(CallRecord(irrelevant.id, irrelevant.ground_truth)).components["unparseable"] == 0.0


def _group(make_sequence, entry_id: str) -> StoredGroup:
    """Three rollouts of one first request, scored by the real checker: right, wrong call, no call."""
    entry = get_entry(entry_id)
    records = [entry.ground_truth[:1], (("ls()",),), ((),)]
    rollouts = []
    for index, calls in enumerate(records):
        score = score_record(CallRecord(entry.id, calls))
        rollouts.append(StoredRollout(index, (make_sequence(6, 5),), score.total, 1.0, "", score.components))
    return StoredGroup("g0", entry.id, StepKind.BASE, Variant.GRPO, PolicyVersion.at_step(0), 0, 0, None, 0.0,
                       rollouts=tuple(rollouts))


def _loss_and_grads(model, items: list[TrainItem], config: LossConfig) -> tuple[float, list[torch.Tensor]]:
    [batch] = make_micro_batches(items, vocab_size=model.config.vocab_size)
    model.zero_grad()
    loss, _ = micro_batch_loss(model, batch, config)
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_an_action_less_rollout_gets_zero_weight_and_no_gradient(tiny_model, make_sequence) -> None:
    group = _group(make_sequence, "multi_turn_base_0")
    items, _ = items_from([group], UpdateConfig(run_dir=".", drop_unparseable=True))
    assert [item.unparseable for item in items] == [False, False, True]
    assert items[2].advantage != 0  # without the filter it would be trained on (pushed down)
    config = LossConfig(drop_unparseable=True)
    [batch] = make_micro_batches(items, vocab_size=tiny_model.config.vocab_size)
    mask = effective_mask(batch, config)
    assert mask[2].sum() == 0 and mask[0].sum() > 0 and mask[1].sum() > 0
    # Its gradient is zero: scaling its advantage leaves the loss and every gradient exactly as they were.
    flipped = [*items[:2], TrainItem(items[2].sequence, -10 * items[2].advantage, unparseable=True)]
    loss, grads = _loss_and_grads(tiny_model, items, config)
    loss_flipped, grads_flipped = _loss_and_grads(tiny_model, flipped, config)
    assert loss == loss_flipped and all(torch.equal(a, b) for a, b in zip(grads, grads_flipped, strict=True))
    # Without the filter the same change moves the gradient: the test above can fail.
    _, unfiltered = _loss_and_grads(tiny_model, items, LossConfig())
    _, unfiltered_flipped = _loss_and_grads(tiny_model, flipped, LossConfig())
    assert not all(torch.equal(a, b) for a, b in zip(unfiltered, unfiltered_flipped, strict=True))
