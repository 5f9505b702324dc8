"""Fixtures for the trainer's tests: a tiny randomly initialised Llama, built locally (no hub)."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from exitagent.types import PolicyVersion, TrainingSequence

VOCAB = 1000


def tiny_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=False,
    )


@pytest.fixture
def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config()).float().eval()


def _random_sequence(rng: random.Random, prompt_len: int, completion_len: int,
                     tool_span: tuple[int, int] | None = None) -> TrainingSequence:
    """Prompt then completion; ``tool_span`` (start, end) inside the completion is masked like a
    tool result. Behaviour logprobs are plausible negatives on the mask, 0.0 elsewhere."""
    n = prompt_len + completion_len
    tokens = tuple(rng.randrange(3, VOCAB) for _ in range(n))
    mask = [0] * prompt_len + [1] * completion_len
    if tool_span is not None:
        for i in range(prompt_len + tool_span[0], prompt_len + tool_span[1]):
            mask[i] = 0
    logprobs = tuple(-rng.uniform(0.1, 5.0) if m else 0.0 for m in mask)
    return TrainingSequence(tokens, tuple(mask), logprobs, PolicyVersion.at_step(0))


@pytest.fixture
def make_sequence():
    """``make_sequence(prompt_len, completion_len, tool_span=None)``, seeded per test.

    A fixture rather than an importable helper: every test directory has a ``conftest`` module,
    so ``from conftest import ...`` could pick up another directory's.
    """
    rng = random.Random(1234)
    return lambda prompt_len, completion_len, tool_span=None: _random_sequence(
        rng, prompt_len, completion_len, tool_span)
