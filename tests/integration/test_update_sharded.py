"""End to end under torchrun: two FSDP ranks train the packaged model from a real store, and a real
``exitagent.serve`` reloads (and verifies by its canary) every checkpoint they publish."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from exitagent.curriculum.store import SQLiteStore
from exitagent.serving import checkpoints
from tests.stores import make_store

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_torchrun_two_ranks_publish_what_serve_reloads(tmp_path: Path, model_dir: Path, serve_factory) -> None:
    run_dir = tmp_path / "run"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    make_store(run_dir, model, AutoTokenizer.from_pretrained(model_dir), 4, group_size=4)
    del model
    server = serve_factory(run_dir)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
             "training.update", "--run-dir", str(run_dir), "--model", str(model_dir), "--groups-per-step", "2",
             "--lr", "1e-5", "--steps", "2", "--beta", "0", "--quiet", "--idle-timeout-s", "30",
             "--dist-timeout-s", "300"],
            capture_output=True, text=True, timeout=1200, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
        assert [step for step, _ in checkpoints.ready_checkpoints(run_dir / "weights")] == [1, 2]
        info = server.wait_for_version("step-000002", timeout_s=300)  # serve verified its canary first
        assert info["checkpoint"].endswith("step-000002")
        with SQLiteStore.in_run(run_dir) as store:
            assert sorted(g.consumed_by_step for g in store.groups()) == [1, 1, 2, 2]
    finally:
        server.stop(signal.SIGTERM)
