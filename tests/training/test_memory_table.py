"""training.memory_table: exact parameter counts, one row against a hand computation, docs/memory.md current."""

from __future__ import annotations

import pytest

from training import memory_table as memory


def test_llama_3b_count_by_hand() -> None:
    h, kv, i, layers, vocab = 3072, 8 * 128, 8192, 28, 128256
    block = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h  # q, o; k, v; gate, up, down; two RMSNorms
    c = memory.counts("llama-3.2-3b")
    assert c.block == block
    assert c.params == vocab * h + layers * block + h == 3_212_749_824  # tied head: counted once
    assert c.lora_per_rank == 28 * 54_272  # r x (in + out) over the 7 linear layers of each block
    # one process: the foreach AdamW step (sqrt of every second moment at once) is the peak
    assert memory.estimate("llama-3.2-3b", "fp32", 1).gpu == pytest.approx((4 + 4 + 8 + 4) * c.params + 4 * c.params)


def test_qwen_7b_fsdp4_row_by_hand() -> None:
    """fp32 master + fp32 AdamW + fp32 reference over 4 ranks, activation checkpointing on."""
    h, kv, i, layers, vocab = 3584, 4 * 128, 18944, 28, 152064
    block = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h + (h + 2 * kv)  # + the q, k, v biases
    params = 2 * vocab * h + layers * block + h  # untied head
    root = params - layers * block
    state = (4 + 4 + 8 + 4) * params / 4
    gathered = 2 * (root + 2 * block) + 4 * (root + block)
    per_token = 4 * h * layers + 2 * (6 * h + 2 * kv + 4 * i)
    head = 3 * 256 * vocab * 4
    got = memory.estimate("qwen2.5-7b", "fp32", 4)
    assert memory.counts("qwen2.5-7b").params == params == 7_615_616_512
    assert got.state == pytest.approx(state)
    assert got.gpu == pytest.approx(state + gathered + 4096 * per_token + head)
    assert 49e9 < got.gpu < 50e9  # the figure docs/memory.md and the recipes quote


def test_offload_moves_the_state_to_the_host() -> None:
    on_gpu = memory.estimate("qwen2.5-7b", "adam8", 8)
    offloaded = memory.estimate("qwen2.5-7b", "adam8", 8, offload=True)
    assert offloaded.state == 0 and offloaded.host == on_gpu.state + on_gpu.step  # the step runs on the host
    assert offloaded.gpu == pytest.approx(on_gpu.gpu - on_gpu.state)


def test_docs_memory_md_is_current() -> None:
    assert memory.main(["--check"]) == 0, "run: python -m training.memory_table"
