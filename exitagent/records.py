"""Token-faithful training records: what the trainer learns from is exactly what the model sampled.

A turn's sample holds the prompt ids the server saw and the ids it sampled. Across turns, each
prompt should extend the previous prompt plus its completion (the chat template renders earlier
turns the same way each time); the extra tokens between them are tool results and template
tokens, which are masked out. Where a prompt does not extend the history (a template that
re-renders earlier turns differently, or truncated history), a new training sequence starts
instead of splicing token streams that the model never saw together.
"""

from __future__ import annotations

from collections.abc import Sequence

from exitagent.types import PolicyVersion, TrainingSequence, Turn


def token_sequences(turns: Sequence[Turn]) -> tuple[TrainingSequence, ...]:
    sequences: list[TrainingSequence] = []
    tokens: list[int] = []
    mask: list[int] = []
    logprobs: list[float] = []
    version: PolicyVersion | None = None
    for turn in turns:
        sample = turn.sample
        if len(sample.logprobs) != len(sample.completion_ids):
            raise ValueError(f"{len(sample.completion_ids)} sampled ids but {len(sample.logprobs)} logprobs")
        prompt = list(sample.prompt_ids)
        if tokens and prompt[: len(tokens)] == tokens:
            new = prompt[len(tokens):]  # tool results and template tokens since the last completion
        else:
            if tokens:
                sequences.append(_freeze(tokens, mask, logprobs, version))
            tokens, mask, logprobs, version, new = [], [], [], None, prompt
        tokens += new + list(sample.completion_ids)
        mask += [0] * len(new) + [1] * len(sample.completion_ids)
        logprobs += [0.0] * len(new) + list(sample.logprobs)
        version = sample.version if version is None else min(version, sample.version)
    if tokens:
        sequences.append(_freeze(tokens, mask, logprobs, version))
    return tuple(sequences)


def _freeze(tokens: list[int], mask: list[int], logprobs: list[float],
            version: PolicyVersion | None) -> TrainingSequence:
    assert version is not None
    return TrainingSequence(tuple(tokens), tuple(mask), tuple(logprobs), version)
