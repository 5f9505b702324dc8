"""Epochs per batch (the paper's tool-use setting, 2): every epoch's PPO ratio is taken against the
FIRST epoch's log-probabilities, the policy before the update, and a batch is still one update."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from exitagent.curriculum.store import SQLiteStore
from tests.stores import tiny_run
from training import update
from training.config import UpdateConfig
from training.trainer import Trainer
from training.update import items_from


@pytest.fixture
def run_dir(tmp_path: Path, model_dir: Path) -> Path:
    tiny_run(tmp_path, model_dir, 2)  # behaviour log-probs: the initial model's
    return tmp_path


def _one_update(run_dir: Path, epochs: int) -> tuple[Trainer, dict[str, float]]:
    cfg = UpdateConfig(run_dir=run_dir, model=str(run_dir / "tiny"), groups_per_step=2, lr=1e-2, beta=0.0,
                       precision="float32", epochs=epochs, activation_checkpointing=False, quiet=True,
                       temperature=1.0)  # the store's behaviour log-probs are the model's own, unscaled
    trainer = Trainer.restore_or_start(cfg)
    with SQLiteStore.in_run(run_dir) as store:
        groups = store.fetch_groups(min_version=0, limit=2)
    metrics = trainer.train_step(items_from(groups, cfg)[0], groups)  # nothing marked: the next trainer sees them too
    assert metrics is not None
    return trainer, metrics


def test_the_second_epoch_measures_its_ratio_against_the_first_epochs_logprobs(run_dir: Path) -> None:
    _, once = _one_update(run_dir, epochs=1)
    trainer, twice = _one_update(run_dir, epochs=2)
    # One epoch: pi_old is pi_theta detached, the ratio is exactly 1.
    assert once["ratio_deviation_mean"] == 0.0
    # Second epoch: the weights moved (lr 1e-2) but pi_old stayed the first epoch's, so the ratio left 1,
    # and pi_old - pi_behaviour is still what it was before the update (~0: the same initial weights).
    # Recomputing pi_old each epoch would give a ratio of 1 and a large old - behaviour gap instead.
    assert twice["ratio_deviation_mean"] > 1e-3
    assert twice["behaviour_logprob_diff_mean"] == pytest.approx(once["behaviour_logprob_diff_mean"], abs=1e-4)
    assert once["behaviour_logprob_diff_mean"] < 1e-3
    assert trainer.step == 1  # two optimizer steps, one update: versions, consumption and publishing count batches


def test_epochs_are_refused_under_torchrun_with_one_clear_error(
        run_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "29999"}.items():
        monkeypatch.setenv(name, value)  # what torchrun sets; the check comes before any process group
    code = update.main(["--run-dir", str(run_dir), "--model", str(run_dir / "tiny"), "--epochs", "2"])
    assert code == 2 and "--epochs > 1 is single-process only" in capsys.readouterr().err


def test_epochs_must_be_positive(run_dir: Path) -> None:
    with pytest.raises(ValueError, match="epochs"):
        dataclasses.replace(UpdateConfig(run_dir=run_dir), epochs=0)
