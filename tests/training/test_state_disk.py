"""The trainer's state on a full disk: one clear error, the last complete state kept, and the
temporary state of a failed save removed before the next one (it is as big as a state)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from exitagent.errors import CheckpointError
from tests import disks
from training import state as trainer_state


class Tokenizer:
    """The one method ``state.save`` needs of a tokenizer."""

    def save_pretrained(self, directory: Path) -> None:
        (Path(directory) / "tokenizer.json").write_text("{}")


def _state(step: int, reference: dict[str, torch.Tensor] | None = None) -> trainer_state.TrainerState:
    return trainer_state.TrainerState(step, {}, reference, trainer_state.rng_state())


def test_a_full_disk_save_is_one_error_and_its_leftover_never_blocks_the_next(
        tmp_path: Path, tiny_model: LlamaForCausalLM) -> None:
    with disks.small_disk(tmp_path / "disk", "3m") as disk:
        states = disk / "trainer"
        stale = states / ".tmp-state-000001-999999"  # a save that died of a full disk earlier
        stale.mkdir(parents=True)
        (stale / "optimizer.pt").write_bytes(b"\0" * (1536 << 10))
        saved = trainer_state.save(states, _state(2), tiny_model, Tokenizer())  # fits only without the leftover
        assert saved.name == "state-000002" and not stale.exists()

        huge = {"w": torch.zeros(1 << 20)}  # 4 MiB of reference weights: the disk is full
        with pytest.raises(CheckpointError, match=r"disk full\?\). The partial state was removed; state-000002"):
            trainer_state.save(states, _state(4, huge), tiny_model, Tokenizer())
        assert sorted(p.name for p in states.iterdir()) == ["state-000002"]
        loaded = trainer_state.load_latest(states)
        assert loaded is not None and loaded[1].step == 2
