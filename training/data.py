"""Scored token sequences -> padded micro-batches for the GRPO loss.

Each item is one ``TrainingSequence`` (prompt ids then sampled ids, with the trainable-token mask
and the behaviour log-probabilities vLLM reported) and the advantage of the response it belongs to.
Items that start with the same prompt (the G responses of a group) are packed together, sorted by
length, and cut where padding would cost more than another micro-batch; a micro-batch's compute,
``prefix + rows * (longest - prefix)`` tokens, stays within ``token_budget``.
``MicroBatch.prefix_len`` is the untrained prefix all rows share: the loss runs it through the model
once, not once per row (``loss.token_logprobs``). With G = 8 and a prompt as long as the answers,
that halves the update's compute.

Right padding throughout: position t of a row is token t of its sequence, so the causal model
needs no position ids, and the loss mask, behaviour log-probabilities and tokens stay aligned.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from exitagent.types import TrainingSequence


@dataclass(frozen=True)
class TrainItem:
    """One sequence to train on. ``label`` names it in error messages (e.g. "group g7 rollout 3").

    ``truncated`` (the response hit its token limit) and ``unparseable`` (no answer could be
    extracted) let the loss leave such responses out when the run asks for it (``LossConfig``).
    """

    sequence: TrainingSequence
    advantage: float
    truncated: bool = False
    unparseable: bool = False
    label: str = ""


@dataclass(frozen=True)
class MicroBatch:
    """Padded tensors for one forward/backward. B rows, T = the longest row.

    ``mask_BT`` is the loss mask (1 on sampled tokens only, 0 on prompt, tool and padding);
    ``attention_BT`` is 1 on every real token. ``behaviour_logprobs_BT`` is 0.0 off the mask.
    """

    tokens_BT: torch.Tensor  # int64
    attention_BT: torch.Tensor  # int64, 1 = real token
    mask_BT: torch.Tensor  # float32, 1 = trainable
    behaviour_logprobs_BT: torch.Tensor  # float32
    advantages_B: torch.Tensor  # float32
    truncated_B: torch.Tensor  # bool
    unparseable_B: torch.Tensor  # bool
    labels: tuple[str, ...]
    prefix_len: int = 0  # tokens[:, :prefix_len] are the same in every row and trained in none

    @property
    def num_tokens(self) -> int:
        """Trainable tokens in this micro-batch (before any filtering)."""
        return int(self.mask_BT.sum())


def _as_item(item: TrainItem | tuple[TrainingSequence, float], index: int) -> TrainItem:
    if isinstance(item, TrainItem):
        return item if item.label else TrainItem(item.sequence, item.advantage, item.truncated,
                                                 item.unparseable, f"item {index}")
    sequence, advantage = item
    return TrainItem(sequence, float(advantage), label=f"item {index}")


def check_vocab(items: Iterable[TrainItem], vocab_size: int) -> None:
    """Raise ValueError naming the first sequence with an id outside ``[0, vocab_size)``.

    An out-of-range id would index past the embedding table: on the CPU that is an opaque
    IndexError deep inside the model, on a GPU a device-side assert that kills the process.
    """
    for item in items:
        bad = [(pos, tok) for pos, tok in enumerate(item.sequence.tokens) if not 0 <= tok < vocab_size]
        if bad:
            pos, tok = bad[0]
            raise ValueError(
                f"{item.label}: token id {tok} at position {pos} is outside the vocabulary "
                f"(size {vocab_size}); {len(bad)} bad id(s) in this sequence. Was it generated "
                f"by a different tokenizer or model?"
            )


def untrained_prefix(sequence: TrainingSequence) -> tuple[int, ...]:
    """The tokens before the first trainable one: the prompt the response was sampled for."""
    first = next((i for i, m in enumerate(sequence.mask) if m), len(sequence.tokens))
    return tuple(sequence.tokens[:first])


def shared_prefix(items: Sequence[TrainItem]) -> int:
    """How many leading tokens every item has in common and none trains on (at most all but one)."""
    prefixes = [untrained_prefix(item.sequence) for item in items]
    limit = min(min(len(p) for p in prefixes), min(len(item.sequence.tokens) for item in items) - 1)
    n = 0
    while n < limit and all(p[n] == prefixes[0][n] for p in prefixes):
        n += 1
    return max(n, 0)


# What one more micro-batch costs besides its tokens, in tokens: one more pass through every layer
# with smaller matrices. A rough figure; it only decides when padding is worth a cut.
MICRO_BATCH_COST = 32


def _cut(items: list[TrainItem], prompt_len: int, token_budget: int) -> list[list[TrainItem]]:
    """Sort by length and cut into the runs that cost the least compute in all.

    A run costs ``prompt_len + rows * (longest - prompt_len)`` tokens (its padding included) plus
    ``MICRO_BATCH_COST``, and stays within ``token_budget`` (an item longer than the budget is a
    run of its own). A group's responses differ in length (one that hits the token limit can be
    twice the others): padding every row to the longest then costs more than running the shared
    prompt once more for the short ones, and this finds where to cut (a small dynamic programme).
    """
    ordered = sorted(items, key=lambda i: len(i.sequence.tokens))
    answers = [len(i.sequence.tokens) - prompt_len for i in ordered]
    least = [0.0] + [math.inf] * len(ordered)  # least[j]: the cheapest way to run the first j items
    start = [0] * (len(ordered) + 1)  # ... whose last run starts at start[j]
    for j in range(1, len(ordered) + 1):
        for i in range(j - 1, -1, -1):  # the last run is ordered[i:j]; ordered[j - 1] is its longest
            compute = prompt_len + (j - i) * answers[j - 1]
            if compute > token_budget and j - i > 1:
                break  # a longer run costs even more
            if least[i] + compute + MICRO_BATCH_COST < least[j]:
                least[j], start[j] = least[i] + compute + MICRO_BATCH_COST, i
    runs, j = [], len(ordered)
    while j > 0:
        runs.append(ordered[start[j]:j])
        j = start[j]
    return runs[::-1]


def _pack(items: list[TrainItem], token_budget: int) -> list[list[TrainItem]]:
    """Items of one prompt together (their prompt runs once); prompts seen once pooled by length."""
    by_prompt: dict[tuple[int, ...], list[TrainItem]] = {}
    for item in items:
        by_prompt.setdefault(untrained_prefix(item.sequence), []).append(item)
    alone = [group[0] for group in by_prompt.values() if len(group) == 1]
    batches = _cut(alone, 0, token_budget)
    for prompt, group in by_prompt.items():
        if len(group) > 1:
            batches += _cut(group, len(prompt), token_budget)
    return batches


def _collate(items: list[TrainItem], pad_id: int) -> MicroBatch:
    rows, width = len(items), max(len(item.sequence.tokens) for item in items)
    tokens_BT = torch.full((rows, width), pad_id, dtype=torch.long)
    attention_BT = torch.zeros((rows, width), dtype=torch.long)
    mask_BT = torch.zeros((rows, width), dtype=torch.float32)
    behaviour_BT = torch.zeros((rows, width), dtype=torch.float32)
    for row, item in enumerate(items):
        seq, n = item.sequence, len(item.sequence.tokens)
        tokens_BT[row, :n] = torch.tensor(seq.tokens, dtype=torch.long)
        attention_BT[row, :n] = 1
        mask_BT[row, :n] = torch.tensor(seq.mask, dtype=torch.float32)
        behaviour_BT[row, :n] = torch.tensor(seq.logprobs, dtype=torch.float32)
    # The contract says logprobs are 0.0 off the mask; enforce it so a stray value can't leak in.
    behaviour_BT = behaviour_BT * mask_BT
    return MicroBatch(
        tokens_BT=tokens_BT,
        attention_BT=attention_BT,
        mask_BT=mask_BT,
        behaviour_logprobs_BT=behaviour_BT,
        advantages_B=torch.tensor([item.advantage for item in items], dtype=torch.float32),
        truncated_B=torch.tensor([item.truncated for item in items], dtype=torch.bool),
        unparseable_B=torch.tensor([item.unparseable for item in items], dtype=torch.bool),
        labels=tuple(item.label for item in items),
        prefix_len=shared_prefix(items) if rows > 1 else 0,
    )


def make_micro_batches(
    items: Sequence[TrainItem | tuple[TrainingSequence, float]],
    *,
    vocab_size: int,
    token_budget: int = 4096,
    pad_id: int = 0,
) -> list[MicroBatch]:
    """Check, group by prompt, sort by length and pack ``items`` into right-padded micro-batches.

    ``token_budget`` bounds the tokens one micro-batch runs through the model, the shared prompt
    counted once (a sequence longer than the budget gets a micro-batch of its own). Items with no
    trainable token are dropped: they would only cost a forward pass. ``pad_id`` must itself be a
    valid id (it is fed to the model).
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be positive, got {token_budget}")
    if not 0 <= pad_id < vocab_size:
        raise ValueError(f"pad_id {pad_id} is outside the vocabulary (size {vocab_size})")
    checked = [_as_item(item, index) for index, item in enumerate(items)]
    check_vocab(checked, vocab_size)
    trainable = [item for item in checked if any(item.sequence.mask)]
    return [_collate(batch, pad_id) for batch in _pack(trainable, token_budget)]
