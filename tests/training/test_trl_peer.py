"""Peer check: our GRPO loss and gradient against TRL 1.16's own GRPOTrainer code on the same batch.

TRL's trainer is driven for real, not re-implemented: a ``GRPOTrainer`` is built offline on a
tiny local Llama (saved to a temporary directory, so TRL loads the policy and builds the
reference model from that path) with a word-level tokenizer made in memory. Its experimental
``rollout_func`` hands TRL our fixed prompts, completions and behaviour log-probabilities in
place of generation, so TRL's ``_generate_and_score_completions`` computes the group advantages,
pi_old, the truncated importance weights (``vllm_importance_sampling_mode="token_truncate"``, cap
2) and the reference log-probabilities, and its ``compute_loss`` the loss. Two attributes are set
by hand, each standing in for something that cannot run here:

- ``use_vllm = True`` after construction: with it set at construction TRL would start a vLLM
  client or engine; the loss path only reads the flag to apply the IS correction.
- ``current_gradient_accumulation_steps = 1``: ``Trainer.train()`` sets it each window.

Mapping: TRL ``loss_type="bnpo"`` (token sum / token count of the batch) is our
``aggregation="token"``; ``"grpo"`` (mean over tokens, then over sequences) is ``"sequence"``.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from exitagent.types import PolicyVersion, TrainingSequence  # noqa: E402
from training.advantage import group_advantages  # noqa: E402
from training.data import TrainItem, make_micro_batches  # noqa: E402
from training.loss import LossConfig, loss_normaliser, micro_batch_loss, token_logprobs  # noqa: E402

G, GROUPS, PROMPT_LEN, VOCAB = 4, 3, 6, 1000
REWARDS = [1.0, 0.0, 0.0, 1.0, 0.0, 0.25, 1.0, 0.5, 1.0, 1.0, 1.0, 1.0]  # the last group: no signal
# fp32 on both sides; the two compute the same math in a different order (chunking, masking).
LOSS_TOL, GRAD_RTOL, GRAD_ATOL = 1e-6, 1e-4, 1e-7


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {f"t{i}": i for i in range(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t0", eos_token="t1", unk_token="t0")


def _rollouts():
    rng = random.Random(7)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(PROMPT_LEN)] for _ in range(GROUPS)]
    completions = [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(3, 11))] for _ in range(G * GROUPS)]
    return [prompts[i // G] for i in range(G * GROUPS)], completions


def _trainer(path, beta: float, loss_type: str, rollout_func) -> GRPOTrainer:
    args = GRPOConfig(
        output_dir=str(path / "out"), report_to="none", use_cpu=True, save_strategy="no",
        per_device_train_batch_size=G * GROUPS, num_generations=G, max_completion_length=16,
        beta=beta, loss_type=loss_type, epsilon=0.2,
        vllm_importance_sampling_correction=True, vllm_importance_sampling_mode="token_truncate",
        vllm_importance_sampling_clip_max=2.0, model_init_kwargs={"dtype": torch.float32},
        bf16=False,  # TRL turns bf16 autocast on by default; compare in float32
    )
    dataset = datasets.Dataset.from_dict({"prompt": ["t5 t6"] * (G * GROUPS)})
    def reward(prompts: Any, completions: Any, **_: Any) -> list[float | None]:
        return list(REWARDS)

    trainer = GRPOTrainer(model=str(path / "tiny"), reward_funcs=reward,
                          args=args, train_dataset=dataset, processing_class=_tokenizer(), rollout_func=rollout_func)
    trainer.use_vllm = True
    trainer._last_loaded_step = trainer.state.global_step  # no weight sync to a server that isn't there
    trainer.current_gradient_accumulation_steps = 1
    return trainer


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("peer")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1,
                         bos_token_id=2, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path / "tiny")
    return path


@pytest.mark.parametrize(("beta", "loss_type", "aggregation"),
                         [(0.0, "bnpo", "token"), (0.1, "bnpo", "token"), (0.1, "grpo", "sequence")])
def test_loss_and_gradients_match_trl(tiny_path, beta, loss_type, aggregation) -> None:
    prompts, completions = _rollouts()
    behaviour: list[list[float]] = []
    trainer = _trainer(tiny_path, beta, loss_type,
                       lambda _prompts, _trainer: {"prompt_ids": prompts, "completion_ids": completions,
                                                   "logprobs": behaviour})
    policy: Any = trainer.model
    torch.manual_seed(1)
    with torch.no_grad():  # move the policy away from the reference so the KL term is not zero
        for param in policy.parameters():
            param.add_(0.05 * torch.randn_like(param))
    policy.train()

    items = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        sequence = TrainingSequence(tuple(prompt + completion), (0,) * PROMPT_LEN + (1,) * len(completion),
                                    (0.0,) * (PROMPT_LEN + len(completion)), PolicyVersion.at_step(0))
        items.append(TrainItem(sequence, 0.0, label=str(i)))
    # One micro-batch per group, its prompt run once (``prefix_len``): the peer runs every row whole.
    batches = make_micro_batches(items, vocab_size=VOCAB)
    assert len(batches) == GROUPS and all(b.prefix_len == PROMPT_LEN for b in batches)
    gen = torch.Generator().manual_seed(2)
    noisy: dict[str, list[float]] = {}
    for batch in batches:
        with torch.no_grad():
            current_BT, _ = token_logprobs(policy, batch.tokens_BT, batch.attention_BT, score_BT=batch.mask_BT > 0,
                                           prefix_len=batch.prefix_len)
        # Stale behaviour log-probabilities: pi_old / pi_behaviour spread around 1, some above the cap 2.
        noisy_BT = (current_BT + 0.6 * torch.randn(current_BT.shape, generator=gen)) * batch.mask_BT
        for row, label in enumerate(batch.labels):
            noisy[label] = noisy_BT[row].tolist()
    for i in range(len(items)):
        behaviour.append(noisy[str(i)][PROMPT_LEN:PROMPT_LEN + len(completions[i])])

    inputs = trainer._generate_and_score_completions([{"prompt": "t5 t6"}] * (G * GROUPS))
    ours_A = torch.cat([group_advantages(REWARDS[g * G:(g + 1) * G]) for g in range(GROUPS)])
    assert torch.allclose(inputs["advantages"], ours_A, atol=1e-6)

    policy.zero_grad()
    trl_loss = trainer.compute_loss(policy, inputs)
    trl_loss.backward()
    trl_grads = {n: p.grad.clone() for n, p in policy.named_parameters()}

    # The same sequences, now with their behaviour log-probabilities and our advantages.
    scored = [TrainItem(TrainingSequence(item.sequence.tokens, item.sequence.mask,
                                         (0.0,) * PROMPT_LEN + tuple(behaviour[i]), item.sequence.version),
                        float(ours_A[i]), label=item.label) for i, item in enumerate(items)]
    ours_batches = make_micro_batches(scored, vocab_size=VOCAB)
    config = LossConfig(beta=beta, aggregation=aggregation, is_cap=2.0)
    normaliser = loss_normaliser(ours_batches, config)
    policy.zero_grad()
    ours_loss, metrics, weight = torch.zeros(()), {"is_truncated_frac": 0.0, "is_weight_mean": 0.0, "kl": 0.0}, 0.0
    for batch in ours_batches:
        loss, batch_metrics = micro_batch_loss(policy, batch, config, ref_model=trainer.ref_model, chunk=16,
                                               normaliser=normaliser)
        loss.backward()
        ours_loss = ours_loss + loss.detach()
        weight += batch.num_tokens
        for key in metrics:  # per-token means, weighted by each micro-batch's tokens as the trainer does
            metrics[key] += batch_metrics.get(key, 0.0) * batch.num_tokens
    metrics = {k: v / weight for k, v in metrics.items()}

    assert float(ours_loss.detach()) == pytest.approx(float(trl_loss.detach()), abs=LOSS_TOL)
    assert 0 < metrics["is_truncated_frac"] < 0.5  # the cap is exercised, not everywhere
    trl_metrics = trainer._metrics["train"]
    assert metrics["is_weight_mean"] == pytest.approx(trl_metrics["sampling/importance_sampling_ratio/mean"][-1],
                                                      rel=1e-5)
    if beta > 0:
        assert metrics["kl"] > 1e-4
        assert metrics["kl"] == pytest.approx(trl_metrics["kl"][-1], rel=1e-4)
    for name, param in policy.named_parameters():
        assert param.grad.abs().sum() > 0, name
        assert torch.allclose(param.grad, trl_grads[name], rtol=GRAD_RTOL, atol=GRAD_ATOL), name
