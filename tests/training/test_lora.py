"""LoRA training mode: an adapter update lowers the loss, publishes a verifiable adapter, and resumes.

A tiny random Llama with the default model's tokenizer, and a real store of scored groups.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from exitagent.curriculum.store import SQLiteStore
from exitagent.serving import adapters, checkpoints, served_form
from tests.stores import make_store
from training.config import UpdateConfig
from training.data import make_micro_batches
from training.loss import loss_normaliser, micro_batch_loss, token_logprobs
from training.publish import CANARY_TEXT
from training.trainer import Trainer
from training.update import items_from


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    directory = tmp_path_factory.mktemp("tiny")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                 tie_word_embeddings=True)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _config(run_dir: Path, model: Path, **overrides: object) -> UpdateConfig:
    settings = {"groups_per_step": 4, "lr": 1e-2, "lora_rank": 8, "lora_alpha": 16, "beta": 0.01,
                "precision": "float32", "quiet": True, **overrides}
    return UpdateConfig(run_dir=run_dir, model=str(model), **settings)  # type: ignore[arg-type]


def _batch_loss(trainer: Trainer, items: list) -> float:
    batches = make_micro_batches(items, vocab_size=trainer.model.config.vocab_size, token_budget=4096, pad_id=0)
    normaliser = loss_normaliser(batches, trainer.loss_cfg)
    with torch.no_grad():
        return sum(float(micro_batch_loss(trainer.model, b, trainer.loss_cfg, ref_model=trainer.reference,
                                          normaliser=normaliser)[0]) for b in batches)


def _canary_ids(trainer: Trainer) -> torch.Tensor:
    return torch.tensor([trainer.tokenizer(CANARY_TEXT, add_special_tokens=False)["input_ids"]])


def test_an_adapter_update_lowers_the_loss_and_publishes_a_servable_adapter(tmp_path: Path, tiny_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    make_store(tmp_path, model, AutoTokenizer.from_pretrained(tiny_dir), 4, group_size=2)
    cfg = _config(tmp_path, tiny_dir)
    trainer = Trainer.restore_or_start(cfg)
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" not in n}
    assert not any(p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" not in n)
    with SQLiteStore.in_run(tmp_path) as store:
        groups = store.fetch_groups(min_version=0, limit=4)
        items, _ = items_from(groups, cfg)
        before = _batch_loss(trainer, items)
        trainer.train_step(items, groups)
        after = _batch_loss(trainer, items)
    assert after < before - 1e-3, (before, after)
    assert all(torch.equal(p, frozen[n]) for n, p in trainer.model.named_parameters() if n in frozen)

    trainer.save_and_publish()
    [(step, published)] = checkpoints.ready_checkpoints(tmp_path / "weights")
    assert step == 1 and sorted(p.name for p in published.iterdir()) == [
        "READY", "adapter_config.json", "adapter_model.safetensors", "canary.json", "manifest.json"]
    assert json.loads((published / "manifest.json").read_text())["format"] == "lora"
    served = checkpoints.tensor_shapes(served_form.serving_copy(tiny_dir, tmp_path / "served"))
    canary = adapters.verify(published, served, max_rank=8)
    # The published files alone (a fresh base plus the adapter, as vLLM loads them) give the canary.
    from peft import PeftModel

    fresh = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), published).eval()
    ids = _canary_ids(trainer)
    logprobs, _ = token_logprobs(fresh.get_base_model(), ids, torch.ones_like(ids))
    assert torch.allclose(logprobs[0, 1:], torch.tensor(canary.logprobs), atol=1e-5)

    resumed = Trainer.restore_or_start(cfg)
    assert resumed.step == 1 and resumed.adapter is not None
    mine = {n: p for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert all(torch.equal(p, mine[n]) for n, p in resumed.model.named_parameters() if "lora_" in n)


def test_the_reference_is_the_adapter_disabled_then_a_frozen_copy(tmp_path: Path, tiny_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    make_store(tmp_path, model, AutoTokenizer.from_pretrained(tiny_dir), 4, group_size=2)
    cfg = _config(tmp_path, tiny_dir, ref_every=1, ref_alpha=0.5)
    trainer = Trainer.restore_or_start(cfg)
    ids = _canary_ids(trainer)
    base, _ = token_logprobs(model.eval(), ids, torch.ones_like(ids))
    with SQLiteStore.in_run(tmp_path) as store:
        groups = store.fetch_groups(min_version=0, limit=4)
        items, _ = items_from(groups, cfg)
        with torch.no_grad():  # before any refresh the reference is the base model itself
            assert torch.allclose(token_logprobs(trainer.reference, ids, torch.ones_like(ids))[0], base, atol=1e-5)
        trainer.train_step(items, groups)  # ref_every=1: refreshed with alpha 0.5 after it
    assert trainer.reference.refreshed and trainer.reference_moved
    with torch.no_grad():
        reference, _ = token_logprobs(trainer.reference, ids, torch.ones_like(ids))
        halved = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
        for name, param in trainer.model.named_parameters():  # the policy with half its update: B / 2
            if name in halved:
                param.mul_(0.5)
        expected, _ = token_logprobs(trainer.model, ids, torch.ones_like(ids))
        for name, param in trainer.model.named_parameters():
            if name in halved:
                param.copy_(halved[name])
    assert torch.allclose(reference, expected, atol=1e-5)
    assert not torch.allclose(reference, base, atol=1e-4)  # it moved, and the policy's adapter still trains
    assert all(p.requires_grad == ("default" in n) for n, p in trainer.model.named_parameters() if "lora_" in n)
    trainer.save_and_publish()
    resumed = Trainer.restore_or_start(cfg)  # the frozen copy comes back from the trainer state
    with torch.no_grad():
        assert torch.allclose(token_logprobs(resumed.reference, ids, torch.ones_like(ids))[0], reference, atol=1e-6)


def test_training_update_lora_from_the_command_line(tmp_path: Path, tiny_dir: Path) -> None:
    import subprocess
    import sys

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    make_store(tmp_path, model, AutoTokenizer.from_pretrained(tiny_dir), 4, group_size=2)
    command = [sys.executable, "-m", "training.update", "--run-dir", str(tmp_path), "--model", str(tiny_dir),
               "--groups-per-step", "2", "--steps", "2", "--lr", "1e-3", "--quiet", "--idle-timeout-s", "5",
               "--lora-rank", "4", "--lora-targets", "q_proj,v_proj", "--optimizer", "adamw8bit"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [step for step, _ in checkpoints.ready_checkpoints(tmp_path / "weights")] == [1, 2]
    served = checkpoints.tensor_shapes(served_form.serving_copy(tiny_dir, tmp_path / "served"))
    adapters.verify(tmp_path / "weights" / "step-000002", served, max_rank=8)
    command[command.index("--run-dir") + 1] = str(tmp_path / "fresh")  # (a saved adapter keeps its own targets)
    command[command.index("--lora-targets") + 1] = "no_such_layer"
    bad = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: cannot attach a LoRA"), \
        bad.stderr[-1000:]
