"""One real update of the packaged model lowers its loss on the batch, and the server reloads it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from exitagent.curriculum.store import SQLiteStore
from tests.stores import make_store
from training.config import UpdateConfig
from training.data import make_micro_batches
from training.loss import loss_normaliser, micro_batch_loss
from training.trainer import Trainer
from training.update import items_from

pytestmark = pytest.mark.vllm


def batch_loss(trainer: Trainer, items) -> float:
    batches = make_micro_batches(items, vocab_size=trainer.model.config.vocab_size)
    normaliser = loss_normaliser(batches, trainer.loss_cfg)
    with torch.no_grad():
        return sum(float(micro_batch_loss(trainer.model, b, trainer.loss_cfg, ref_model=trainer.reference,
                                          normaliser=normaliser)[0]) for b in batches)


def test_one_update_lowers_the_loss_and_is_served(served, model_dir: Path) -> None:
    run_dir = served.weights_dir.parent
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    make_store(run_dir, model, AutoTokenizer.from_pretrained(model_dir), 4, group_size=4)
    # temperature 1: the store's behaviour log-probs are the model's own, unscaled (make_store)
    cfg = UpdateConfig(run_dir=run_dir, groups_per_step=4, lr=1e-5, precision="float32", temperature=1.0)
    trainer = Trainer.restore_or_start(cfg)
    with SQLiteStore.in_run(run_dir) as store:
        groups = store.fetch_groups()
        items, counts = items_from(groups, cfg)
        assert counts["groups_no_signal"] == 0 and items
        before = batch_loss(trainer, items)
        store.mark_consumed([g.id for g in groups], trainer.step + 1)  # as training.update does first
        metrics = trainer.train_step(items, groups)
        after = batch_loss(trainer, items)
        assert metrics is not None and trainer.step == 1
        assert all(g.consumed_by_step == 1 for g in store.groups())
    print(f"loss on the batch: {before:.5f} -> {after:.5f}")
    assert after < before
    trainer.save_and_publish()
    info = served.wait_for_version("step-000001", timeout_s=120)
    assert info["checkpoint"].endswith("step-000001")
