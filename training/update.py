"""GRPO updates from the curriculum store; every K updates a checkpoint the server hot-reloads.

    python -m training.update --run-dir RUN --model smollm2-135m [--steps N]
    torchrun --nproc-per-node N -m training.update ...     (FSDP2 over N processes: training/sharded.py)

Without ``--steps`` it follows the store until stopped (SIGINT/SIGTERM finish the current step).

Crash safety (a ``kill -9`` at any point, then a restart, neither loses nor double-trains a
group). Three records are tied together by the step number N:

1. the store marks the groups of update N with ``consumed_by_step = N`` in one transaction,
   before the trainer touches them (a refusal after that, such as tokens outside the vocabulary,
   ends the process like a crash: the next start releases them);
2. every K updates the trainer saves its complete state (model, optimizer, reference, RNG) as
   ``RUN/trainer/state-N`` (write, fsync, rename, then COMPLETE marker);
3. only then is the model published as ``RUN/weights/step-N`` (hard links to the state's files).

On start, the trainer loads the newest complete state S (or the initial model, S = 0), tells the
store to forget consumption by any step > S (those updates died with the process, so their groups
are trained again, once), and publishes step S if the crash came between 2 and 3. So every group
is either in the saved weights exactly once, or unconsumed and waiting. One trainer per run: a
second one on the same RUN is refused (``RUN/trainer/update.lock``, released by the kernel even
after a kill -9).

``run``'s loop below does them in this order, in one place: read groups, mark them consumed by
N, train, and every K updates save and publish. Under torchrun the same loop runs on rank 0 with
``training.sharded.ShardedTrainer`` (the other ranks follow it); the protocol above is unchanged.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import signal
import sys
import time
from typing import Any

import anyio
import structlog
from tqdm import tqdm

from exitagent import config
from exitagent import log as logging_setup
from exitagent.curriculum.store import CurriculumStore
from exitagent.curriculum.store_url import open_run_store, redact
from exitagent.errors import ConfigError, ExitAgentError, ExitCode, fail, unwrap
from exitagent.faults import crash_point
from exitagent.log import MetricsFile
from exitagent.run_dir import RunDir
from exitagent.types import StoredGroup, Variant
from training import distributed
from training import state as trainer_state
from training.advantage import group_advantages
from training.config import UpdateConfig
from training.data import TrainItem
from training.trainer import Trainer

log = structlog.get_logger(__name__)


def items_from(groups: list[StoredGroup], cfg: UpdateConfig) -> tuple[list[TrainItem], dict[str, float]]:
    """Training items with their group-relative advantages; groups with no signal contribute none."""
    items: list[TrainItem] = []
    counts = {"groups": float(len(groups)), "groups_no_signal": 0.0, "rollouts_failed": 0.0}
    for group in groups:
        scored = [r for r in group.rollouts if r.reward is not None]
        counts["rollouts_failed"] += len(group.rollouts) - len(scored)
        if len(scored) < 2 or len({r.reward for r in scored}) == 1:
            counts["groups_no_signal"] += 1
            continue
        multipliers = [r.diversity for r in scored] if group.variant is Variant.EXIT and cfg.diversity else None
        advantages = group_advantages([float(r.reward) for r in scored], scale_by_std=not cfg.dr_grpo,  # type: ignore[arg-type]
                                      multipliers_G=multipliers)
        for rollout, advantage in zip(scored, advantages.tolist(), strict=True):
            for sequence in rollout.sequences:
                items.append(TrainItem(sequence, advantage, truncated=rollout.components.get("truncated", 0) > 0,
                                       unparseable=rollout.components.get("unparseable", 0) > 0,
                                       label=f"group {group.id} rollout {rollout.index}"))
    return items, counts


def gather(store: CurriculumStore, trainer: Trainer, cfg: UpdateConfig, metrics: MetricsFile) -> list[StoredGroup]:
    """Up to ``groups_per_step`` fresh groups; stale ones are dropped (and counted) first."""
    min_version = max(0, trainer.step - cfg.max_staleness)
    dropped = store.drop_stale(min_version, trainer.step + 1)
    if dropped:
        log.warning("stale_groups_dropped", count=dropped, min_version=min_version,
                    hint="groups recorded before training (an app's traffic) need --max-staleness above the "
                         "updates to make")
        metrics.write("stale_dropped", step=trainer.step, count=dropped)
    return store.fetch_groups(min_version=min_version, limit=cfg.groups_per_step)


def record(metrics: MetricsFile, bar: Any, step: int, row: dict[str, float], groups: list[StoredGroup]) -> None:
    """Update ``step``'s metrics row (with the groups' staleness and peak memory), and the progress bar."""
    staleness = [step - 1 - g.version.step for g in groups]
    row = {**row, "staleness_mean": sum(staleness) / len(staleness), "staleness_max": float(max(staleness)),
           "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    metrics.write("update", step=step, **row)
    bar.update(1)
    bar.set_postfix(loss=f"{row.get('loss', 0):.4f}", reward=f"{row.get('reward_mean', 0):.2f}")


async def run(cfg: UpdateConfig, trainer: Trainer | None = None) -> int:
    trainer = trainer or Trainer.restore_or_start(cfg)
    with open_run_store(cfg.run_dir, cfg.store) as store:
        released = store.unconsume(trainer.step + 1)
        if released:
            log.warning("consumption_rolled_back", groups=released, resumed_at=trainer.step)
        trainer.ensure_published()
        tracker = cfg.open_tracker(cfg.run_dir, "update")  # --track: a second sink beside the JSONL file
        metrics = MetricsFile(RunDir(cfg.run_dir).metrics_file("update"), tracker=tracker)
        target = cfg.steps or None  # absolute: rerunning the same command after a crash finishes the run
        bar = tqdm(total=cfg.steps or None, initial=trainer.step, desc="update", unit="step", file=sys.stderr,
                   disable=cfg.quiet)
        idle_since = time.monotonic()
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            stop = anyio.Event()

            async def watch() -> None:
                async for _ in signals:
                    log.info("update_stopping")
                    stop.set()
                    return

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(watch)
                while not stop.is_set() and (target is None or trainer.step < target):
                    groups = gather(store, trainer, cfg, metrics)
                    if len(groups) < cfg.groups_per_step and not (groups and cfg.partial_batches):
                        if cfg.idle_timeout_s and time.monotonic() - idle_since > cfg.idle_timeout_s:
                            print(f"error: no groups to train on in {cfg.run_dir} for {cfg.idle_timeout_s:.0f} s "
                                  f"(is collect running?)", file=sys.stderr)
                            tasks.cancel_scope.cancel()
                            return ExitCode.IDLE
                        with anyio.move_on_after(cfg.poll_s):
                            await stop.wait()
                        trainer.idle()
                        continue
                    idle_since = time.monotonic()
                    store.mark_consumed([g.id for g in groups], trainer.step + 1)  # 1: before training on them
                    crash_point("after_consume", trainer.step + 1)
                    items, counts = items_from(groups, cfg)
                    result = await anyio.to_thread.run_sync(trainer.train_step, items, groups)
                    if result is None:
                        metrics.write("no_signal", step=trainer.step, **counts)
                        continue
                    record(metrics, bar, trainer.step, {**result, **counts}, groups)
                    if trainer.step % cfg.publish_every == 0:  # 2 and 3: save the state, then publish
                        await anyio.to_thread.run_sync(trainer.save_and_publish)
                tasks.cancel_scope.cancel()
        bar.close()
        metrics.close()
    return ExitCode.OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.update", description=__doc__.split("\n\n")[0])
    config.add_arguments(parser, UpdateConfig)
    args = config.parse_args(parser, argv, "update")
    try:
        cfg = config.from_args(UpdateConfig, args)
        logging_setup.configure(json_lines=cfg.log_json or None)
        world = distributed.from_env()
        if world is not None:  # started by torchrun
            if cfg.epochs > 1:  # ShardedTrainer's step is one pass; its ranks would disagree on pi_old
                raise ConfigError("--epochs > 1 is single-process only for now: run without torchrun, or --epochs 1")
            from training.sharded import main_sharded

            return main_sharded(cfg, world, run)
        with trainer_state.sole_writer(RunDir(cfg.run_dir).trainer):  # before anything of the run is written
            config.save(dataclasses.replace(cfg, store=redact(cfg.store)), cfg.run_dir, "update")  # no password
            return anyio.run(run, cfg)
    except BaseException as raised:  # re-raised below unless it is ours
        error = unwrap(raised)
        if not isinstance(error, ExitAgentError):
            raise
        return fail(error)


if __name__ == "__main__":
    sys.exit(main())
