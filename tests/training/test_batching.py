"""Micro-batches from scored sequences: right padding, alignment, packing and the vocabulary check."""

from __future__ import annotations

import pytest
import torch

from training.data import TrainItem, make_micro_batches


def test_right_padding_keeps_tokens_mask_and_logprobs_aligned(make_sequence) -> None:
    short, long = make_sequence(3, 4), make_sequence(5, 9, tool_span=(2, 4))
    (batch,) = make_micro_batches([(long, 0.5), (short, -1.0)], vocab_size=1000, pad_id=7)
    assert batch.tokens_BT.shape == (2, 14)
    row = batch.labels.index("item 1")  # packing sorts by length: the short one comes first
    assert row == 0
    assert batch.tokens_BT[0, :7].tolist() == list(short.tokens)
    assert batch.tokens_BT[0, 7:].tolist() == [7] * 7
    assert batch.attention_BT[0].tolist() == [1] * 7 + [0] * 7
    assert batch.mask_BT[0].tolist() == list(short.mask) + [0] * 7
    assert batch.mask_BT[1].tolist() == list(long.mask)
    assert sum(long.mask) == 7  # the tool span is masked out of the loss
    assert torch.allclose(batch.behaviour_logprobs_BT[1], torch.tensor(long.logprobs))
    assert batch.advantages_B.tolist() == [-1.0, 0.5]
    assert batch.num_tokens == 4 + 7


def test_packing_respects_the_token_budget(make_sequence) -> None:
    lengths = [5, 40, 7, 33, 12, 20, 6, 38, 9, 25]
    items = [TrainItem(make_sequence(2, n - 2), 1.0, label=f"s{n}") for n in lengths]
    batches = make_micro_batches(items, vocab_size=1000, token_budget=64)
    assert sorted(label for b in batches for label in b.labels) == sorted(f"s{n}" for n in lengths)
    for batch in batches:
        assert batch.tokens_BT.numel() <= 64
    # Sorted by length, so padding is small: at most the gap between neighbours in each batch.
    padding = sum(int((b.attention_BT == 0).sum()) for b in batches)
    assert padding < 0.25 * sum(lengths)


def test_a_groups_responses_share_one_micro_batch_and_its_prompt(make_sequence) -> None:
    prompt = make_sequence(10, 0)
    group = [type(prompt)(prompt.tokens + tuple(range(100, 100 + n)), prompt.mask + (1,) * n,
                          prompt.logprobs + (-0.5,) * n, prompt.version) for n in (3, 8, 5, 6)]
    strays = [make_sequence(4, 4), make_sequence(6, 2)]  # prompts seen once: pooled by length
    items = [TrainItem(seq, 1.0, label=f"g{i}") for i, seq in enumerate(group)]
    items += [TrainItem(seq, 1.0, label=f"s{i}") for i, seq in enumerate(strays)]
    batches = make_micro_batches(items, vocab_size=1000, token_budget=10 + 4 * 8)
    shared = [b for b in batches if b.labels[0].startswith("g")]
    assert len(shared) == 1 and sorted(shared[0].labels) == ["g0", "g1", "g2", "g3"]
    assert shared[0].prefix_len == 10  # the prompt runs once; answers differ from token 10 on
    assert shared[0].tokens_BT.numel() > 10 + 4 * 8  # padded rows exceed the budget; the compute does not
    assert [sorted(b.labels) for b in batches if b.labels[0].startswith("s")] == [["s0", "s1"]]
    # One token smaller and the group no longer fits one micro-batch.
    assert len([b for b in make_micro_batches(items, vocab_size=1000, token_budget=10 + 4 * 8 - 1)
                if b.labels[0].startswith("g")]) == 2


def test_a_long_response_gets_its_own_micro_batch_when_padding_to_it_costs_more(make_sequence) -> None:
    prompt = make_sequence(40, 0)

    def group(*answers: int) -> list[TrainItem]:
        return [TrainItem(type(prompt)(prompt.tokens + tuple(range(100, 100 + n)), prompt.mask + (1,) * n,
                                       prompt.logprobs + (-0.5,) * n, prompt.version), 1.0, label=f"a{n}-{i}")
                for i, n in enumerate(answers)]

    # seven short answers and one that hit the token limit: padding seven rows to 60 tokens costs
    # 7 * 50 tokens, running the 40-token prompt once more costs 40 (+ a micro-batch's overhead)
    batches = make_micro_batches(group(*[10] * 7, 60), vocab_size=1000)
    assert [b.tokens_BT.shape for b in batches] == [(7, 50), (1, 100)]
    assert [b.prefix_len for b in batches] == [40, 0]  # one row shares with nobody
    # answers of similar length stay together: a cut would save less than it costs
    (together,) = make_micro_batches(group(*[10] * 7, 14), vocab_size=1000)
    assert together.tokens_BT.shape == (8, 54) and together.prefix_len == 40


def test_a_sequence_longer_than_the_budget_gets_its_own_batch(make_sequence) -> None:
    items = [(make_sequence(2, 3), 1.0), (make_sequence(10, 90), 1.0)]
    batches = make_micro_batches(items, vocab_size=1000, token_budget=50)
    assert [b.tokens_BT.shape for b in batches] == [(1, 5), (1, 100)]


def test_out_of_vocabulary_ids_name_the_sequence(make_sequence) -> None:
    good, bad = make_sequence(3, 3), make_sequence(3, 3)
    bad = type(bad)((*bad.tokens[:4], 1000, bad.tokens[5]), bad.mask, bad.logprobs, bad.version)
    items = [TrainItem(good, 1.0, label="group g1 rollout 0"), TrainItem(bad, 1.0, label="group g1 rollout 1")]
    with pytest.raises(ValueError, match=r"group g1 rollout 1: token id 1000 at position 4.*size 1000"):
        make_micro_batches(items, vocab_size=1000)
    with pytest.raises(ValueError, match="item 0: token id -1"):
        make_micro_batches([(type(good)((-1, *good.tokens[1:]), good.mask, good.logprobs, good.version), 1.0)],
                           vocab_size=1000)
    with pytest.raises(ValueError, match="pad_id"):
        make_micro_batches([(good, 1.0)], vocab_size=1000, pad_id=1000)


def test_sequences_without_trainable_tokens_are_dropped(make_sequence) -> None:
    prompt_only = make_sequence(6, 0)
    batches = make_micro_batches([(prompt_only, 1.0), (make_sequence(2, 2), 1.0)], vocab_size=1000)
    assert [b.tokens_BT.shape[0] for b in batches] == [1]
    assert make_micro_batches([(prompt_only, 1.0)], vocab_size=1000) == []


def test_stray_logprobs_off_the_mask_are_zeroed(make_sequence) -> None:
    seq = make_sequence(2, 2)
    seq = type(seq)(seq.tokens, seq.mask, (-9.0, -9.0, *seq.logprobs[2:]), seq.version)
    (batch,) = make_micro_batches([TrainItem(seq, 1.0, truncated=True)], vocab_size=1000)
    assert batch.behaviour_logprobs_BT[0, :2].tolist() == [0.0, 0.0]
    assert batch.truncated_B.tolist() == [True] and batch.unparseable_B.tolist() == [False]
