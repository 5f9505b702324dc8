"""training.update: one real update lowers the loss, bad input errors, and crash safety under kill -9."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from exitagent.curriculum.store import SQLiteStore
from exitagent.curriculum.store_url import open_run_store, pin_run_store
from exitagent.serving import checkpoints, served_form
from tests.stores import make_store
from training.state import complete_states, sole_writer


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    """A tiny random Llama with the default model's tokenizer: crash tests need speed, not skill."""
    directory = tmp_path_factory.mktemp("tiny")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                         tie_word_embeddings=True))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def update(run_dir: Path, model: Path, *flags: str, fault: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **({"EXITAGENT_FAULT": fault} if fault else {})}
    return subprocess.run([sys.executable, "-m", "training.update", "--run-dir", str(run_dir), "--model", str(model),
                           "--groups-per-step", "2", "--lr", "1e-4", "--quiet", "--idle-timeout-s", "5",
                           "--poll-s", "0.2", *flags], capture_output=True, text=True, env=env, timeout=600)


def lineage(run_dir: Path) -> list[str]:
    """Group ids in the newest saved trainer state's lineage, in training order."""
    state = complete_states(run_dir / "trainer")[-1]
    return [group for _, groups in json.loads((state / "meta.json").read_text())["history"] for group in groups]


@pytest.mark.parametrize("fault", ["after_consume:2", "before_publish:2", "mid_publish:2", "postgresql"])
def test_kill_9_then_restart_trains_every_group_exactly_once(tmp_path: Path, tiny_model_dir: Path, fault: str,
                                                             request: pytest.FixtureRequest) -> None:
    if fault == "postgresql":  # the same crash, with the run's store in PostgreSQL (found by RUN/store.url)
        pin_run_store(tmp_path, request.getfixturevalue("postgres").url(schema=f"u_{os.getpid()}"))
        fault = "after_consume:2"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    groups = make_store(tmp_path, model, tokenizer, 6, group_size=2)
    crashed = update(tmp_path, tiny_model_dir, "--steps", "3", fault=fault)
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    resumed = update(tmp_path, tiny_model_dir, "--steps", "3")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    trained = lineage(tmp_path)
    assert sorted(trained) == sorted(groups) and len(trained) == len(set(trained))  # each exactly once
    with open_run_store(tmp_path) as store:  # RUN/store.url when a test put one there
        consumed = {g.id: g.consumed_by_step for g in store.groups()}
    assert set(consumed.values()) <= {1, 2, 3, 4} and None not in consumed.values()
    published = checkpoints.ready_checkpoints(tmp_path / "weights")
    assert published[-1][0] == 3  # the last update was saved and published
    assert [p.name for p in complete_states(tmp_path / "trainer")] == ["state-000003"]  # older states pruned
    served = served_form.serving_copy(tiny_model_dir, tmp_path / "served")  # what serve compares against
    for _, path in published:
        checkpoints.verify(path, checkpoints.tensor_shapes(served))


def test_the_trainer_survives_a_postgres_restart(tmp_path: Path, tiny_model_dir: Path, postgres: Any) -> None:
    """pg_ctl restart while training.update runs on a PostgreSQL store: it reconnects, and every
    group is still trained exactly once."""
    pin_run_store(tmp_path, postgres.url(schema=f"r_{os.getpid()}"))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    groups = make_store(tmp_path, model, tokenizer, 12, group_size=2)  # 6 steps: the restart lands mid-run
    log = tmp_path / "update.err"
    with log.open("w") as err:
        trainer = subprocess.Popen([sys.executable, "-m", "training.update", "--run-dir", str(tmp_path), "--model",
                                    str(tiny_model_dir), "--groups-per-step", "2", "--steps", "6", "--quiet",
                                    "--idle-timeout-s", "30", "--poll-s", "0.2", "--max-staleness", "10"],
                                   stderr=err, text=True)
        metrics = tmp_path / "metrics" / "update.jsonl"
        deadline = time.monotonic() + 300
        while not (metrics.exists() and '"update"' in metrics.read_text()):  # mid-run: one update made
            assert trainer.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)
        postgres.restart()
        assert trainer.wait(timeout=600) == 0, log.read_text()[-2000:]
    assert "store_reconnecting" in log.read_text()  # the restart cut its connection
    trained = lineage(tmp_path)
    assert sorted(trained) == sorted(groups) and len(trained) == len(set(trained))


def test_empty_store_under_steps_is_a_clear_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    SQLiteStore.in_run(tmp_path).close()
    result = update(tmp_path, tiny_model_dir, "--steps", "1", "--idle-timeout-s", "1")
    assert result.returncode == 3
    assert "no groups to train on" in result.stderr.strip().splitlines()[-1]


def test_a_second_trainer_on_the_same_run_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    SQLiteStore.in_run(tmp_path).close()
    running = tmp_path / "config" / "update.json"  # what the first trainer recorded of itself
    running.parent.mkdir()
    running.write_text("{}\n")
    with sole_writer(tmp_path / "trainer"):  # this test process is the first trainer
        refused = update(tmp_path, tiny_model_dir, "--steps", "1", "--idle-timeout-s", "1")
    assert refused.returncode == 2
    assert f"another trainer (pid {os.getpid()}) is updating" in refused.stderr
    assert running.read_text() == "{}\n"  # the refused one wrote nothing of the run
    after = update(tmp_path, tiny_model_dir, "--steps", "1", "--idle-timeout-s", "1")
    assert after.returncode == 3  # the lock went with its holder: this one ran, and found no groups


def test_tokens_outside_the_vocabulary_are_refused(tmp_path: Path, tiny_model_dir: Path, model_dir: Path) -> None:
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1))
    small = tmp_path / "small-vocab"
    tiny.save_pretrained(small)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(small)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    groups = make_store(tmp_path / "run", model, AutoTokenizer.from_pretrained(tiny_model_dir), 2, group_size=2)
    result = update(tmp_path / "run", small, "--steps", "1")
    assert result.returncode == 2 and "vocab" in result.stderr.strip().splitlines()[-1]
    # The groups were marked consumed before the refusal: like a crash, the next start releases them.
    assert update(tmp_path / "run", tiny_model_dir, "--steps", "1").returncode == 0
    assert sorted(lineage(tmp_path / "run")) == sorted(groups)


def test_a_model_directory_that_does_not_load(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    result = update(tmp_path, broken, "--steps", "1")
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error: cannot load")


def test_track_wandb_offline_records_the_updates_beside_the_jsonl(tmp_path: Path, tiny_model_dir: Path) -> None:
    pytest.importorskip("wandb")  # exitagent[track]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    make_store(tmp_path, model, AutoTokenizer.from_pretrained(tiny_model_dir), 2, group_size=2)
    result = update(tmp_path, tiny_model_dir, "--steps", "1", "--track", "wandb", "--track-run", "e2e")
    assert result.returncode == 0, result.stderr[-2000:]
    assert '"kind": "update"' in (tmp_path / "metrics" / "update.jsonl").read_text()
    [record] = (tmp_path / "tracking" / "wandb").glob("offline-run-*/run-*.wandb")
    assert b"update/loss" in record.read_bytes() and b"e2e-update" in record.read_bytes()
