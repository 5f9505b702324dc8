"""The trainer under torchrun: FSDP2 shards on every rank; rank 0 alone touches the run's files.

Rank 0 runs ``training.update``'s loop exactly as one process does: it alone opens the store,
holds the trainer lock, writes metrics and publishes. At each step it sends the other ranks a
command (``broadcast``) and their micro-batches (``scatter``); they run ``follow()`` until told to
stop. While rank 0 waits for groups it sends ``idle`` every poll, so no collective waits longer than
the process-group timeout (``--dist-timeout-s``) unless a rank is gone, and then it raises.

The saved state (``training.state``'s tmp -> rename -> COMPLETE protocol, unchanged): rank 0
writes the full model as an ordinary fp32 checkpoint (what is published, and what a restart loads
and broadcasts); the optimizer's shards, and the reference's once it has moved, go through
``torch.distributed.checkpoint`` into ``shards/``, one file per rank; each rank writes its RNG state.
Every rank writes into the same directory: across nodes the run directory must be shared.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import random
import time
from pathlib import Path
from typing import Any

import structlog
import torch
import torch.distributed as dist

from exitagent import models
from exitagent.curriculum.store_url import redact
from exitagent.errors import ConfigError, ExitAgentError, ExitCode
from exitagent.faults import crash_point
from exitagent.run_dir import RunDir
from exitagent.serving import checkpoints
from exitagent.types import StoredGroup
from training import distributed
from training import state as trainer_state
from training.config import UpdateConfig
from training.data import MicroBatch, TrainItem, make_micro_batches
from training.distributed import World
from training.loss import loss_normaliser
from training.publish import compute_canary, publish_from
from training.trainer import Trainer, load_tokenizer

log = structlog.get_logger(__name__)


def _device(cfg: UpdateConfig) -> str:
    return "cuda" if cfg.device == "auto" and torch.cuda.is_available() else ("cpu" if cfg.device == "auto"
                                                                               else cfg.device)


class ShardedTrainer(Trainer):
    """``Trainer``'s four calls, collective: rank 0 calls them, the other ranks ``follow()``."""

    def __init__(self, cfg: UpdateConfig, model: Any, tokenizer: Any, reference: Any, step: int,
                 world: World) -> None:
        super().__init__(cfg, model, tokenizer, reference, step)
        self.world = world

    @classmethod
    def start(cls, cfg: UpdateConfig, world: World) -> ShardedTrainer:
        device = distributed.device_of(_device(cfg))
        base = distributed.from_rank0(lambda: models.resolve(cfg.model), world)
        latest = distributed.from_rank0(lambda: trainer_state.complete_states(RunDir(cfg.run_dir).trainer)[-1:], world)
        source = latest[0] if latest else base
        model = distributed.load(source, world, device, cfg.fsdp_cpu_offload)
        if cfg.activation_checkpointing:
            model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        tokenizer = distributed.from_rank0(lambda: load_tokenizer(source), world)
        reference = distributed.load(base, world, device, cfg.fsdp_cpu_offload, frozen=True) if cfg.beta > 0 else None
        saved = trainer_state.read_meta(latest[0]) if latest else None
        trainer = cls(cfg, model, tokenizer, reference, saved.step if saved else 0, world)
        if latest and saved:
            trainer._restore(latest[0], saved)
        else:
            random.seed(cfg.seed + world.rank)
            torch.manual_seed(cfg.seed + world.rank)
            log.info("trainer_started", model=str(base), device=str(device), rank=world.rank, world_size=world.size)
        return trainer

    def _restore(self, path: Path, saved: trainer_state.TrainerState) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        if not (path / trainer_state.SHARDS).is_dir():
            raise ExitAgentError(f"{path} was saved by a single-process trainer: resume it without torchrun")
        optimizer = {"optimizer": get_optimizer_state_dict(self.model, self.optimizer)}
        dcp.load(optimizer, checkpoint_id=path / trainer_state.SHARDS / "optimizer")
        set_optimizer_state_dict(self.model, self.optimizer, optimizer["optimizer"])
        if self.reference is not None and (path / trainer_state.SHARDS / "reference").is_dir():
            reference = {"model": get_model_state_dict(self.reference)}
            dcp.load(reference, checkpoint_id=path / trainer_state.SHARDS / "reference")
            set_model_state_dict(self.reference, reference["model"])
            self.reference_moved = True
        self.bad_steps, self.history = saved.bad_steps, saved.history
        rng = path / f"rng-{self.world.rank}.pt"
        if rng.is_file():  # absent when the run resumes on more ranks than it saved with
            trainer_state.restore_rng(torch.load(rng, weights_only=False))
        log.info("trainer_resumed", step=saved.step, state=str(path), rank=self.world.rank)

    # --- rank 0 ------------------------------------------------------------------------------------

    def _command(self, name: str, payload: Any = None) -> None:
        distributed.broadcast((name, payload), self.world)

    def idle(self) -> None:
        self._command("idle")

    def close(self) -> None:
        with contextlib.suppress(Exception):  # the others may be gone already (that is why we stop)
            self._command("stop")

    def ensure_published(self) -> None:
        weights = RunDir(self.cfg.run_dir).weights
        if self.step and not any(step == self.step for step, _ in checkpoints.ready_checkpoints(weights)):
            self._command("publish")
            self._publish()

    def train_step(self, items: list[TrainItem], groups: list[StoredGroup]) -> dict[str, float] | None:
        started = time.perf_counter()
        try:
            batches = make_micro_batches(items, vocab_size=self.model.config.vocab_size,
                                         token_budget=self.cfg.token_budget, pad_id=self.tokenizer.pad_token_id or 0)
        except ValueError as error:
            raise ExitAgentError(f"cannot train on the stored groups: {error}") from error
        ids = [g.id for g in groups]  # already consumed by step + 1 in the store (training.update)
        normaliser = loss_normaliser(batches, self.loss_cfg)
        self._command("step", (ids, normaliser, bool(batches)))
        result = self._step(ids, normaliser, bool(batches), distributed.balance(batches, self.world.size))
        if result is None:
            return None
        metrics, grad_norm, tokens = result
        return self._step_metrics(metrics, grad_norm, len(items), tokens, groups, started)

    def save_and_publish(self) -> None:
        self._command("save")
        self._save_and_publish()

    # --- every rank --------------------------------------------------------------------------------

    def follow(self) -> None:
        """Ranks > 0: do what rank 0 says until it says stop."""
        while True:
            name, payload = distributed.broadcast(None, self.world)
            if name == "stop":
                return
            if name == "step":
                ids, normaliser, any_batches = payload
                self._step(ids, normaliser, any_batches, None)
            elif name == "save":
                self._save_and_publish()
            elif name == "publish":
                self._publish()

    def _step(self, ids: list[str], normaliser: float, any_batches: bool,
              shares: list[list[MicroBatch]] | None) -> tuple[dict[str, float], float, int] | None:
        """One update, on every rank; rank 0 passes every rank's micro-batches (``shares``)."""
        received: list[Any] = [None]
        dist.scatter_object_list(received, shares, src=0)
        mine: list[MicroBatch] = received[0]
        self.history.append([self.step + 1, ids])
        if not self.world.is_main:  # rank 0 passed this point in training.update, right after marking
            crash_point("after_consume", self.step + 1)
        if not any_batches:
            return None
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        # Every rank runs as many micro-batches as the busiest one: the rest are zero-loss dummies.
        count = max(len(share) for share in shares) if shares is not None else 0
        count = distributed.broadcast(count, self.world)
        batches = mine + [distributed.dummy_batch(self.tokenizer.pad_token_id or 0)] * (count - len(mine))
        totals: dict[str, float] = {}
        tokens = 0
        for index, batch in enumerate(batches):
            # FSDP averages gradients over the ranks; the loss is already divided by the global count.
            tokens += self._backward(batch, normaliser, totals, scale=self.world.size if index < len(mine) else 0.0)
        totals["tokens_"], totals["trained_"] = tokens, sum(b.num_tokens for b in mine)
        totals = distributed.all_sum(totals, sorted(totals))
        tokens, trained = int(totals.pop("tokens_")), totals.pop("trained_") or 1
        result = {k: (v if k == "loss" else v / trained) for k, v in totals.items()}
        grad_norm = distributed.clip_grad_norm(self.model, self.cfg.grad_clip)
        self._apply(result, grad_norm)
        return result, grad_norm, tokens

    def _apply(self, result: dict[str, float], grad_norm: float, advance: bool = True) -> None:
        self._reshard()
        super()._apply(result, grad_norm, advance)

    def _reshard(self) -> None:
        """Back to shards only. FSDP leaves a root unit gathered after a forward without backward
        (the reference's, the canary's): its parameters would be plain tensors, not the shards that
        the refresh and the checkpoint read."""
        for model in (self.model, self.reference):
            if model is not None:
                model.reshard()

    def _save_and_publish(self) -> None:
        self._reshard()
        state = trainer_state.TrainerState(self.step, {}, None, {}, self.bad_steps, self.history)
        full = distributed.full_state_dict(self.model)
        if self.world.is_main:
            trainer_state.commit(self.state_dir, self.step, lambda tmp: self._write(tmp, state, full))
        else:
            self._write(None, state, full)
        full.clear()  # rank 0's full copy of the model: gone before the canary's forward
        crash_point("before_publish", self.step)
        self._publish()

    def _write(self, tmp: Path | None, state: trainer_state.TrainerState, full: dict[str, torch.Tensor]) -> None:
        import torch.distributed.checkpoint as dcp
        from safetensors.torch import save_file
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        tmp = Path(distributed.broadcast(str(tmp), self.world))
        if self.world.is_main:
            lm = self.model.lm
            if getattr(lm.config, "tie_word_embeddings", False):
                full.pop("lm_head.weight", None)  # the embedding matrix, as save_pretrained writes a tied model
            save_file({k: v.contiguous() for k, v in full.items()}, str(tmp / "model.safetensors"),
                      metadata={"format": "pt"})
            lm.config.save_pretrained(tmp)
            if getattr(lm, "generation_config", None) is not None:
                lm.generation_config.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
        shards = tmp / trainer_state.SHARDS
        optimizer = get_optimizer_state_dict(self.model, self.optimizer)
        dcp.save({"optimizer": optimizer}, checkpoint_id=shards / "optimizer")
        if self.reference is not None and self.reference_moved:
            dcp.save({"model": get_model_state_dict(self.reference)}, checkpoint_id=shards / "reference")
        rng = tmp / f"rng-{self.world.rank}.pt"
        torch.save(trainer_state.rng_state(), rng)
        checkpoints.fsync(rng)
        dist.barrier()  # every rank's files are on disk before rank 0 renames the directory
        if self.world.is_main:
            trainer_state.write_meta(tmp, state)

    def _publish(self) -> None:
        """The canary needs every rank (a forward of the sharded model); rank 0 publishes."""
        self.model.eval()
        canary = compute_canary(self.model, self.tokenizer, tolerance=self.canary_tolerance)
        self._reshard()
        if self.world.is_main:
            directory = self.state_dir / f"state-{self.step:06d}"
            path = publish_from(directory, RunDir(self.cfg.run_dir).weights, self.step, canary, keep=self.cfg.keep,
                                dtype=self.precision.dtype)
            log.info("checkpoint_published", step=self.step, path=str(path))


def check_options(cfg: UpdateConfig) -> None:
    """Refuse the memory options the sharded trainer does not implement yet, rather than ignore them:
    LoRA, torchao's optimizers (8-bit AdamW, bf16 weights with stochastic rounding) and the bf16
    reference were built for one process; under FSDP2 their state would have to be sharded too."""
    used = {"--lora-rank": cfg.lora_rank > 0, "--optimizer adamw8bit": cfg.optimizer != "adamw",
            "--weights-dtype bfloat16": cfg.weights_dtype != "float32",
            "--reference-dtype bfloat16": cfg.reference_dtype != "float32"}
    unsupported = [flag for flag, on in used.items() if on]
    if unsupported:
        raise ConfigError(f"{', '.join(unsupported)}: not supported under torchrun yet (one process only); "
                          f"FSDP2 shards the fp32 weights, AdamW state and reference over the ranks instead")


def main_sharded(cfg: UpdateConfig, world: World, run: Any) -> int:
    """Every rank: join the group; rank 0 takes the run's lock and runs ``run`` (training.update's
    loop), the others follow. A refusal on rank 0 (the lock is held) stops every rank with it."""
    check_options(cfg)
    distributed.start(world, _device(cfg), cfg.dist_timeout_s, cfg.fsdp_cpu_offload)
    try:
        return _train(cfg, world, run)
    finally:
        # The trainer is gone by now (it lived in _train's frame): its FSDP units held the process
        # group, and a gloo group still alive at interpreter exit aborts the process (SIGABRT,
        # "terminate called without an active exception") after a run that succeeded.
        gc.collect()
        distributed.stop()


def _train(cfg: UpdateConfig, world: World, run: Any) -> int:
    import anyio

    from exitagent import config

    with contextlib.ExitStack() as stack:
        refusal = None
        if world.is_main:
            try:
                stack.enter_context(trainer_state.sole_writer(RunDir(cfg.run_dir).trainer))
                config.save(dataclasses.replace(cfg, store=redact(cfg.store)), cfg.run_dir, "update")
            except ExitAgentError as error:
                refusal = str(error)
        if distributed.broadcast(refusal, world):
            raise ExitAgentError(refusal if world.is_main else "rank 0 refused to start (see its error)")
        trainer = ShardedTrainer.start(cfg, world)
        if not world.is_main:
            trainer.follow()
            return ExitCode.OK
        try:
            return int(anyio.run(run, cfg, trainer))
        finally:
            trainer.close()
