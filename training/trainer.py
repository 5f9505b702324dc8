"""The single-process trainer: one model, one optimizer, one GRPO step at a time.

``training.update`` only calls ``restore_or_start``, ``ensure_published``, ``train_step``,
``save_and_publish``, ``idle`` and ``close``; under torchrun ``training.sharded.ShardedTrainer``
(FSDP2) answers the same calls, reusing this class's micro-batch, step and metric pieces.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from typing import Any

import structlog
import torch

from exitagent import models, precision
from exitagent.errors import ExitAgentError, ModelError
from exitagent.faults import crash_point
from exitagent.run_dir import RunDir
from exitagent.serving import checkpoints
from exitagent.types import StoredGroup
from training import lora, memory
from training import state as trainer_state
from training.config import UpdateConfig
from training.data import MicroBatch, TrainItem, make_micro_batches
from training.loss import (
    LossConfig,
    loss_normaliser,
    micro_batch_loss,
    old_logprobs,
    reference_due,
    refresh_reference,
)
from training.publish import compute_canary, publish_from

log = structlog.get_logger(__name__)


def _load(directory: Any, dtype: torch.dtype, device: torch.device) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    except (OSError, ValueError) as error:
        reason = " ".join(str(error).split())[:300]  # one line: entry points print it as the error line
        raise ModelError(f"cannot load a model from {directory}: {reason}") from error
    return model.to(device)  # type: ignore[arg-type]


def load_tokenizer(source: Any) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load a tokenizer from {source}: {' '.join(str(error).split())[:200]}") from error


class Trainer:
    def __init__(self, cfg: UpdateConfig, model: Any, tokenizer: Any, reference: Any, step: int,
                 adapter: Any = None) -> None:
        self.cfg = cfg
        self.device = next(model.parameters()).device
        self.precision = precision.choose(cfg.precision, precision.detect(self.device.type))
        log.info("precision_chosen", dtype=self.precision.dtype, reason=self.precision.reason,
                 capability=self.precision.hardware.describe(), master_weights=cfg.weights_dtype)
        self.model, self.tokenizer, self.reference = model, tokenizer, reference
        self.adapter = adapter  # LoRA: the peft model around ``model`` (training.lora); None: full fine-tuning
        self.step = step
        self.bad_steps = 0
        self.history: list[list[Any]] = []  # [step, group ids] of every update in this model's lineage
        self.reference_moved = False  # the reference differs from the initial model (must be saved)
        self.loss_cfg = LossConfig(epsilon_low=cfg.epsilon, epsilon_high=cfg.epsilon, is_cap=cfg.is_cap,
                                   beta=cfg.beta, aggregation=cfg.aggregation,  # type: ignore[arg-type]
                                   drop_truncated=cfg.drop_truncated, drop_unparseable=cfg.drop_unparseable,
                                   temperature=cfg.temperature)
        self.optimizer = memory.build_optimizer(model.parameters(), kind=cfg.optimizer, weights_dtype=cfg.weights_dtype,
                                                lr=cfg.lr, weight_decay=cfg.weight_decay)

    @property
    def state_dir(self) -> Any:
        return RunDir(self.cfg.run_dir).trainer

    @classmethod
    def restore_or_start(cls, cfg: UpdateConfig) -> Trainer:
        device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                              ("cpu" if cfg.device == "auto" else cfg.device))
        base = models.resolve(cfg.model)
        saved = trainer_state.load_latest(RunDir(cfg.run_dir).trainer)
        source = saved[0] if saved else base
        weights = memory.dtype_of(cfg.weights_dtype, "--weights-dtype")  # master weights; compute: cfg.precision
        model = _load(base if cfg.lora_rank else source, weights, device)
        # benchmarks/trainer.py: about half the peak memory for ~13% more time; without it each group's
        # prompt runs once for its G responses (loss.token_logprobs), so small models train faster off
        if cfg.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        tokenizer = load_tokenizer(source)
        adapter = None
        if cfg.lora_rank:  # the trainer works on the causal LM with the adapter's layers injected
            adapter = lora.attach(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=cfg.lora_targets,
                                  saved=saved[0] if saved else None)
            model = adapter.get_base_model()
        reference = None
        if cfg.beta > 0 and adapter is not None:
            reference = lora.AdapterReference(adapter)  # the adapter disabled: no copy of the model
        elif cfg.beta > 0:
            reference_dtype = memory.dtype_of(cfg.reference_dtype, "--reference-dtype")
            reference = _load(base, reference_dtype, device).eval().requires_grad_(False)
        trainer = cls(cfg, model, tokenizer, reference, step=saved[1].step if saved else 0, adapter=adapter)
        if saved:
            state = saved[1]
            trainer.optimizer.load_state_dict(state.optimizer)
            trainer.bad_steps = state.bad_steps
            trainer.history = state.history
            if state.reference is not None and reference is not None:
                reference.load_state_dict(state.reference)
                trainer.reference_moved = True
            trainer_state.restore_rng(state.rng)
            log.info("trainer_resumed", step=state.step, state=str(saved[0]))
        else:
            random.seed(cfg.seed)
            torch.manual_seed(cfg.seed)
            log.info("trainer_started", model=str(base), device=str(device))
        return trainer

    @property
    def canary_tolerance(self) -> float:
        """What the canary may differ by when the checkpoint is served in the dtype it is published in."""
        return precision.canary_tolerance(self.precision.dtype)

    def idle(self) -> None:
        """Called while the loop waits for groups (the sharded trainer keeps its ranks in step)."""

    def close(self) -> None:
        """Called once the loop is done."""

    def ensure_published(self) -> None:
        """Publish the saved state's weights if a crash came between saving and publishing."""
        if self.step == 0:
            return
        weights = RunDir(self.cfg.run_dir).weights
        if any(step == self.step for step, _ in checkpoints.ready_checkpoints(weights)):
            return
        self._publish()

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if not self.precision.autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def train_step(self, items: list[TrainItem], groups: list[StoredGroup]) -> dict[str, float] | None:
        """One update on ``items``, from ``groups``, which the caller has already marked consumed by
        step ``self.step + 1`` (training.update: the crash-safety order is written there).

        Returns None, without an update, when no group carried a learning signal: the groups stay
        consumed (by the next step, so a crash before it is saved releases them again).
        """
        started = time.perf_counter()
        try:
            batches = make_micro_batches(items, vocab_size=self.model.config.vocab_size,
                                         token_budget=self.cfg.token_budget,
                                         pad_id=self.tokenizer.pad_token_id or 0)
        except ValueError as error:
            raise ExitAgentError(f"cannot train on the stored groups: {error}") from error
        self.history.append([self.step + 1, [g.id for g in groups]])
        if not batches:
            return None
        self.model.train()
        normaliser = loss_normaliser(batches, self.loss_cfg)
        # PPO's pi_old is the policy before this update: every epoch's ratio is taken against the first
        # epoch's log-probabilities (one epoch: pi_theta detached, which is the same thing).
        old: list[torch.Tensor | None] = [None] * len(batches)
        if self.cfg.epochs > 1:
            with self._autocast():
                old = [old_logprobs(self.model, b, self.loss_cfg, chunk=self.cfg.logprob_chunk) for b in batches]
        for epoch in range(self.cfg.epochs):
            self.optimizer.zero_grad(set_to_none=True)
            totals: dict[str, float] = {}
            tokens = 0
            for batch, old_BT in zip(batches, old, strict=True):
                tokens += self._backward(batch, normaliser, totals, old_logprobs_BT=old_BT)
            trained = sum(b.num_tokens for b in batches) or 1
            result = {k: (v if k == "loss" else v / trained) for k, v in totals.items()}
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip))
            self._apply(result, grad_norm, advance=epoch == self.cfg.epochs - 1)  # one update per batch
        return self._step_metrics(result, grad_norm, len(items), tokens, groups, started)

    def _backward(self, batch: MicroBatch, normaliser: float, totals: dict[str, float], scale: float = 1.0,
                  old_logprobs_BT: torch.Tensor | None = None) -> int:
        """Forward and backward of one micro-batch (loss times ``scale``); adds its metrics, weighted
        by its trainable tokens, to ``totals``. Returns its real tokens."""
        with self._autocast():
            loss, metrics = micro_batch_loss(self.model, batch, self.loss_cfg, ref_model=self.reference,
                                             old_logprobs_BT=old_logprobs_BT, normaliser=normaliser,
                                             chunk=self.cfg.logprob_chunk)
        (loss * scale if scale != 1.0 else loss).backward()
        weight = batch.num_tokens if scale else 0
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + value * (1.0 if key == "loss" and scale else weight)
        return int(batch.attention_BT.sum()) if scale else 0

    def _apply(self, result: dict[str, float], grad_norm: float, advance: bool = True) -> None:
        """The optimizer step (skipped when the loss or gradient is not finite), then, with ``advance``
        (the last epoch over a batch), the update count and the reference refresh."""
        if not (math.isfinite(result.get("loss", 0.0)) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_steps += 1
            log.error("update_skipped_non_finite", step=self.step + 1, loss=result.get("loss"), grad_norm=grad_norm)
            if self.bad_steps >= self.cfg.max_bad_steps:
                raise ExitAgentError(f"{self.bad_steps} non-finite updates in a row: stopping (lower --lr?)")
        else:
            self.optimizer.step()
            self.bad_steps = 0
        if not advance:
            return
        self.step += 1
        if reference_due(self.step, self.cfg.ref_every) and self.reference is not None:
            refresh_reference(self.model, self.reference, self.cfg.ref_alpha)
            self.reference_moved = True

    def _step_metrics(self, result: dict[str, float], grad_norm: float, sequences: int, tokens: int,
                      groups: list[StoredGroup], started: float) -> dict[str, float]:
        rewards = [r.reward for g in groups for r in g.rollouts if r.reward is not None]
        seconds = time.perf_counter() - started
        return {**result, "grad_norm": grad_norm, "sequences": float(sequences), "tokens": float(tokens),
                "tokens_per_s": tokens / seconds, "seconds": seconds, "skipped": float(self.bad_steps > 0),
                "reward_mean": sum(rewards) / max(1, len(rewards))}

    def save_and_publish(self) -> None:
        reference = self.reference.state_dict() if self.reference is not None and self.reference_moved else None
        saved = trainer_state.TrainerState(self.step, self.optimizer.state_dict(), reference,
                                           trainer_state.rng_state(), self.bad_steps, self.history)
        checkpointed = self.model if self.adapter is None else lora.AdapterSaver(self.adapter)
        trainer_state.save(self.state_dir, saved, checkpointed, self.tokenizer)
        crash_point("before_publish", self.step)
        self._publish()

    def _publish(self) -> None:
        directory = self.state_dir / f"state-{self.step:06d}"
        self.model.eval()
        canary = compute_canary(self.model, self.tokenizer, tolerance=self.canary_tolerance)
        weights = RunDir(self.cfg.run_dir).weights
        if self.adapter is not None:
            path = lora.publish_adapter(directory, weights, self.step, canary, base=self.model, keep=self.cfg.keep)
        else:
            path = publish_from(directory, weights, self.step, canary, keep=self.cfg.keep, dtype=self.precision.dtype)
        log.info("checkpoint_published", step=self.step, path=str(path))
