"""The foundation's acceptance: a real CPU vLLM server on the packaged model, hot reload included."""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from exitagent.serving import checkpoints
from training.publish import publish_model

pytestmark = pytest.mark.vllm

PROMPT = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, serve_factory):
    server = serve_factory(tmp_path_factory.mktemp("reload"))
    yield server
    if server.process.poll() is None:
        server.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def trainer_model(model_dir: Path):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(model_dir)


def greedy(server) -> tuple[str, str]:
    """(text, policy version header) of a greedy chat completion through the openai SDK."""
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="policy", messages=PROMPT, max_tokens=24, temperature=0.0
    )
    return raw.parse().choices[0].message.content or "", raw.headers["x-exitagent-policy-version"]


def test_chat_completion_returns_token_ids_and_logprobs(server) -> None:
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    completion = client.chat.completions.create(
        model="policy", messages=PROMPT, max_tokens=16, temperature=1.0, n=2, logprobs=True,
        extra_body={"return_token_ids": True},
    )
    extra = completion.model_extra or {}
    assert extra["prompt_token_ids"] and all(isinstance(t, int) for t in extra["prompt_token_ids"])
    for choice in completion.choices:
        token_ids = (choice.model_extra or {})["token_ids"]
        assert choice.logprobs is not None and choice.logprobs.content is not None
        assert len(token_ids) == len(choice.logprobs.content) > 0
        assert all(entry.logprob <= 0.0 for entry in choice.logprobs.content)


def test_admin_routes_are_not_exposed(server) -> None:
    for path in ("/pause", "/collective_rpc", "/reset_prefix_cache", "/update_weight_version", "/resume"):
        assert httpx.post(server.root_url + path, timeout=10).status_code == 404, path
    assert httpx.get(server.root_url + "/weight_info", timeout=10).status_code == 404


def test_published_checkpoint_is_served_and_changes_output(server, trainer_model) -> None:
    model, tokenizer = trainer_model
    before, version = greedy(server)
    assert version == "base"
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # a real change: two layers' MLPs zeroed
        for layer in (3, 4):
            for parameter in model.model.layers[layer].mlp.parameters():
                parameter.zero_()
    started = time.monotonic()
    publish_model(model, tokenizer, server.weights_dir, step=1)
    info = server.wait_for_version("step-000001")
    print(f"publish-to-served {time.monotonic() - started:.1f} s, raw reload {info['last_reload_s']} s")
    after, version = greedy(server)
    assert version == "step-000001"
    assert after != before
    model.load_state_dict(original)
    (record,) = checkpoints.served_records(server.weights_dir).values()
    assert record["checkpoint"].endswith("step-000001") and record["base"]["name"] == "smollm2-135m"


def test_bad_checkpoints_are_rejected_and_the_next_good_one_loads(server, trainer_model) -> None:
    model, tokenizer = trainer_model
    serving = server.policy()["version"]
    rejected = server.policy()["rejected"]
    # Truncated after it was marked READY (a disk fault): the manifest catches it.
    truncated = publish_model(model, tokenizer, server.weights_dir, step=10)
    with sorted(truncated.glob("*.safetensors"))[0].open("r+b") as file:
        file.truncate(10_000_000)
    # Incomplete: files but no READY marker. Never read.
    incomplete = server.weights_dir / "step-000020"
    shutil.copytree(truncated, incomplete)
    (incomplete / checkpoints.READY).unlink()
    deadline = time.monotonic() + 30
    while server.policy()["rejected"] == rejected and time.monotonic() < deadline:
        time.sleep(0.5)
    info = server.policy()
    assert info["version"] == serving and info["rejected"] == rejected + 1
    assert "truncated" in info["last_error"]
    text, version = greedy(server)  # still serving
    assert version == serving and text
    # Another architecture (a different width and depth): refused before vLLM sees it.
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=model.config.vocab_size, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    publish_model(tiny, tokenizer, server.weights_dir, step=25)
    deadline = time.monotonic() + 30
    while server.policy()["rejected"] == rejected + 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "another architecture" in server.policy()["last_error"]
    assert server.policy()["version"] == serving
    # The next good checkpoint (the original weights) loads, and the greedy output comes back.
    publish_model(model, tokenizer, server.weights_dir, step=30)
    server.wait_for_version("step-000030")
    assert greedy(server)[1] == "step-000030"
    assert server.policy()["rejected"] == rejected + 2  # step 20 (no READY) was never looked at


def test_stopping_serve_leaves_no_vllm_process(server) -> None:
    code = server.stop(signal.SIGTERM)
    assert code == 0
    assert server.descendants, "serve should have had vLLM children"
    deadline = time.monotonic() + 10
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in server.descendants):
        assert time.monotonic() < deadline, [p for p in server.descendants if p.is_running()]
        time.sleep(0.2)
