"""Malformed checkpoints against a real server: each is rejected with an event, the served
version stays and keeps answering, and the next good checkpoint loads (one server start)."""

from __future__ import annotations

import copy
import json
import math
import shutil
import signal
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from exitagent.precision import canary_tolerance
from exitagent.serving import checkpoints
from training.publish import compute_canary, publish_model

pytestmark = pytest.mark.vllm


def stale_head_distance(model: Any, tokenizer: Any, base_head: torch.Tensor, tokens: int = 16) -> float:
    """Mean |dlogp| over the canary's first ``tokens`` between ``model`` (tied) and the same body with
    ``base_head`` as its output layer: what a reload that kept the base head would be measured at."""
    stale = copy.deepcopy(model)
    stale.config.tie_word_embeddings = False
    stale.lm_head.weight = torch.nn.Parameter(base_head.clone())
    ours, theirs = compute_canary(model, tokenizer), compute_canary(stale, tokenizer)
    return sum(abs(a - b) for a, b in zip(ours.logprobs[:tokens], theirs.logprobs[:tokens], strict=True)) / tokens


def _rewrite_manifest(path: Path) -> None:
    (path / checkpoints.MANIFEST).unlink()
    checkpoints.write_manifest(path)


def weights_file(path: Path) -> Path:
    return sorted(path.glob("*.safetensors"))[0]  # shard 1 of the served form (exitagent.serving.served_form)


def header_a_list(path: Path) -> None:
    raw = b"[1, 2]"
    target = weights_file(path)
    target.unlink()  # a hard link to the trainer's file: replace, never write through
    target.write_bytes(struct.pack("<Q", len(raw)) + raw)
    _rewrite_manifest(path)


def entry_without_size(path: Path) -> None:
    manifest = json.loads((path / checkpoints.MANIFEST).read_text())
    del manifest["files"]["config.json"]["size"]
    (path / checkpoints.MANIFEST).write_text(json.dumps(manifest))


def unlisted_weights(path: Path) -> None:
    shutil.copyfile(weights_file(path), path / "extra.safetensors")


def canary_nan(path: Path) -> None:
    canary = json.loads((path / checkpoints.CANARY).read_text())
    canary["logprobs"][0] = math.nan
    (path / checkpoints.CANARY).unlink()
    (path / checkpoints.CANARY).write_text(json.dumps(canary))
    _rewrite_manifest(path)


def test_malformed_checkpoints_are_rejected_and_the_next_good_one_loads(
        tmp_path: Path, serve_factory, model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    server = serve_factory(tmp_path / "run")
    try:
        weights = server.weights_dir
        cases: list[Callable[[Path], None]] = [header_a_list, entry_without_size, unlisted_weights, canary_nan]
        for step, damage in enumerate(cases, start=1):  # damaged before the server can see them
            staged = publish_model(model, tokenizer, tmp_path / "staging", step=step, keep=100)
            damage(staged)
            staged.rename(weights / staged.name)
        # A step directory that is a symlink to a good checkpoint outside the weights directory.
        outside = publish_model(model, tokenizer, tmp_path / "elsewhere", step=9)
        (weights / "step-000009").symlink_to(outside)
        deadline = time.monotonic() + 60
        while server.policy()["rejected"] < 5 and time.monotonic() < deadline:
            time.sleep(0.5)
        info = server.policy()
        assert info["version"] == "base" and info["rejected"] == 5, info
        answer = httpx.post(f"{server.base_url}/completions", timeout=60,
                            json={"model": "policy", "prompt": "1 + 1 =", "max_tokens": 4, "temperature": 0})
        assert answer.status_code == 200 and answer.headers["x-exitagent-policy-version"] == "base"
        events = [json.loads(line) for line in server.log_path.read_text().splitlines() if line.startswith("{")]
        reasons = [e["reason"] for e in events if e.get("event") == "checkpoint_rejected"]
        assert len(reasons) == 5, reasons
        for expected in ("not a tensor map", "integer size", "not listed", "not a finite number", "symlink out"):
            assert any(expected in reason for reason in reasons), (expected, reasons)
        publish_model(model, tokenizer, weights, step=10, keep=100)
        assert server.wait_for_version("step-000010")["rejected"] == 5
        # A tied head that moved must be served too (exitagent.serving.served_form): before, an in-place
        # reload kept the base head, and this checkpoint's canary failed.
        with torch.no_grad():
            embedding = model.get_input_embeddings().weight
            base_head = embedding.detach().clone()
            embedding.add_(torch.randn(embedding.shape, generator=torch.Generator().manual_seed(0)) * 0.02)
        stale = stale_head_distance(model, tokenizer, base_head)  # what serving the base head would show
        publish_model(model, tokenizer, weights, step=11, keep=100)
        assert stale > 2 * canary_tolerance("bfloat16")  # the widest the server uses: a kept base head is refused
        assert server.wait_for_version("step-000011")["rejected"] == 5  # so the head that moved is served
        events = [json.loads(line) for line in server.log_path.read_text().splitlines() if line.startswith("{")]
        loaded = [e for e in events if e.get("event") == "checkpoint_loaded" and e["version"] == "step-000011"]
        # bf16 serving: 0.04-0.09 from rounding alone, depending on the draw; fp32: < 1e-4
        assert loaded and loaded[0]["canary_distance"] < stale / 4, (loaded, stale)
        assert server.process.poll() is None
    finally:
        server.stop(signal.SIGTERM)
