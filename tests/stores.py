"""Build real curriculum stores for trainer tests: real token ids, real behaviour log-probabilities.

Each group asks one arithmetic question; its rollouts are the right answer and wrong ones, tokenized
with the model's chat template exactly as vLLM would see them, and their behaviour log-probabilities
come from the model itself (so importance weights start at 1, as for fresh on-policy samples).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from exitagent.curriculum.store_url import open_run_store
from exitagent.types import (
    Episode,
    Group,
    Message,
    PolicyVersion,
    Rollout,
    Sample,
    Score,
    StepKind,
    StopReason,
    Task,
    TrainingSequence,
    Turn,
    Variant,
)


@torch.no_grad()
def sampled(model: Any, tokenizer: Any, question: str, answer: str, version: PolicyVersion) -> Sample:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    completion = tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits.float()[0, len(prompt) - 1: -1]
    logprobs = torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
    return Sample(answer, tuple(prompt), tuple(completion), tuple(logprobs.tolist()), "stop", version)


def make_store(run_dir: Path, model: Any, tokenizer: Any, n_groups: int, *, group_size: int = 4,
               version: int = 0) -> list[str]:
    """Record ``n_groups`` scored groups in the run's store (``RUN/store.url``, else
    ``RUN/store.sqlite``); returns their ids."""
    ids = []
    with open_run_store(run_dir) as store:
        for g in range(n_groups):
            a, b = 3 + g, 4 + 2 * g
            task = Task(f"add-{g}", "math", f"What is {a} + {b}?", str(a + b))
            answers = [f"The answer is {a + b}."] + [f"The answer is {a + b + k}." for k in range(1, group_size)]
            rollouts = []
            for k, answer in enumerate(answers):
                sample = sampled(model, tokenizer, task.prompt, answer, PolicyVersion.at_step(version))
                sequence = TrainingSequence(sample.prompt_ids + sample.completion_ids,
                                            (0,) * len(sample.prompt_ids) + (1,) * len(sample.completion_ids),
                                            (0.0,) * len(sample.prompt_ids) + sample.logprobs, sample.version)
                episode = Episode(task, (Message("user", task.prompt), Message("assistant", answer)),
                                  (Turn(sample),), StopReason.ANSWERED, (sequence,))
                reward = 1.0 if k == 0 else 0.0
                rollouts.append(Rollout(episode, Score(reward, {"correct": reward}), reward))
            group = Group(f"g{version}-{g}", task.id, StepKind.BASE, Variant.GRPO, PolicyVersion.at_step(version),
                          0, tuple(rollouts))
            store.record_group(group, lambda buffer: None)
            ids.append(group.id)
    return ids


def tiny_run(run_dir: Path, tokenizer_dir: Path, n_groups: int, *, group_size: int = 2) -> Path:
    """A tiny random Llama with ``tokenizer_dir``'s tokenizer in ``RUN/tiny``, and ``n_groups``
    groups whose behaviour log-probabilities are its own. Returns the model's directory."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))
    tiny.save_pretrained(run_dir / "tiny")
    tokenizer.save_pretrained(run_dir / "tiny")
    make_store(run_dir, tiny, tokenizer, n_groups, group_size=group_size)
    return run_dir / "tiny"
