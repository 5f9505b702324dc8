"""Collect scored groups into a run's curriculum store: the ExIt loop of exit-spec.md section 2.

    python -m exitagent.collect --run-dir runs/math --base-url http://127.0.0.1:8000/v1 \\
        --domain math --variant exit --groups 1000 --group-size 8 --concurrency 8

Each of ``--concurrency`` workers repeats: pass the staleness gate, choose a start (a base task,
or once the buffer holds B_min entries and with probability p, a buffer entry with a replay,
improve or divergence step), sample G responses in one request, score them, add the diversity
multipliers (full ExIt), then record the group, its children and the refresh of its start in one
store transaction (``Curriculum.record``). Per-group metrics go to
``RUN/metrics/collect-HOST-PID.jsonl`` (one file per collector: many may share a run), the config
to ``RUN/config/collect.json`` and ``RUN/config/curriculum.json``.

Staleness gate: ``staleness.py`` (collection pauses while the trainer is behind).

Several servers: ``--base-url`` given more than once. Each group goes to the least busy server and
stays there; a server that stops answering is ejected and probed again later, and its groups in
flight run again elsewhere (``exitagent.routing``). Servers that serve different base models are
refused at start. Each group's metrics name its server and the version skew between servers.

Stopping and resuming. SIGINT or SIGTERM: start no new group, finish the groups in flight, exit 0.
A second signal: discard the groups in flight (nothing of them is written) and exit 130. A group is
recorded in one transaction, so even ``kill -9`` leaves no partial group. ``--groups`` is the RUN's
total: a rerun on the same run dir counts the groups already in the store and collects the rest
(0: until stopped). Group ids carry a random per-invocation prefix, so reruns never collide.

Exit codes: 0 done or stopped; 1 the server failed (after the client's retries); 2 bad
configuration, or a store this version cannot read; 130 forced stop.
"""

from __future__ import annotations

import argparse
import random
import secrets
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any

import anyio
import structlog
from tqdm import tqdm

from evaluators.base import Evaluator
from evaluators.worlds.word_problems import refuse_training
from exitagent import routing
from exitagent.collect_config import CollectConfig
from exitagent.config import add_arguments, from_args, parse_args, save
from exitagent.curriculum import Curriculum, Start, chains
from exitagent.curriculum.store import CurriculumStore
from exitagent.curriculum.store_url import open_run_store, redact
from exitagent.diversity import Embedder, MiniLMEmbedder
from exitagent.domains import Domain, get_domain
from exitagent.errors import ConfigError, ExitAgentError, ExitCode, fail
from exitagent.log import MetricsFile, collector_metrics, configure
from exitagent.policy import Policy
from exitagent.rollouts import with_diversity
from exitagent.routing import Pinned, RoutedPolicy
from exitagent.staleness import StalenessGate
from exitagent.types import APP_TASK_PREFIX, Group, Task, Variant

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Summary:
    groups: int  # recorded by this call
    total_groups: int  # in the store when it ended
    rollouts: int
    failed_rollouts: int  # evaluator failures and crashed episodes: kept out of training
    crashed_rollouts: int  # of those, episodes an unexpected exception ended (logged as episode_crashed)
    from_buffer: int
    shortened_starts: int  # buffer starts whose prompt did not fit, re-attempted as base tasks
    paused_s: float
    mean_reward: float | None
    stopped: bool  # a stop was asked for before the --groups total was reached


def load_tasks(cfg: CollectConfig) -> list[Task]:
    """The tasks to train on; ``ConfigError`` for the held-out word problems, by name or by content."""
    refuse_training(cfg.task_source)  # before loading: clearer than the split error it would meet there
    tasks = get_domain(cfg.domain).load_tasks(cfg.task_spec())
    refuse_training(cfg.task_source, tasks)
    return tasks


@dataclass
class _Run:
    """What collect's workers share. Counters change only between awaits, so no lock."""

    cfg: CollectConfig
    domain: Domain
    policy: RoutedPolicy
    evaluator: Evaluator
    store: CurriculumStore
    curriculum: Curriculum
    gate: StalenessGate
    stop: anyio.Event
    metrics: MetricsFile
    bar: Any
    embedder: Embedder | None
    quota: int | None  # groups still to collect (None: until stopped)
    session: str = field(default_factory=lambda: secrets.token_hex(4))
    embed_lock: anyio.Lock = field(default_factory=anyio.Lock)
    started: int = 0
    recorded: int = 0
    rollouts: int = 0
    failed: int = 0
    crashed: int = 0
    from_buffer: int = 0
    shortened: int = 0
    rewards: list[float] = field(default_factory=list)

    def more(self) -> bool:
        return not self.stop.is_set() and (self.quota is None or self.started < self.quota)


async def _one_group(run: _Run, group_id: str) -> None:
    began = time.monotonic()
    with run.store.view() as buffer:
        start = run.curriculum.choose_start(buffer)
    if run.cfg.variant is Variant.CHAINS:  # the naive control: K single-sample steps before the group
        start = await chains.grow(run.policy, start, run.curriculum.rng, run.cfg.chain_max_depth, run.cfg.sampling)
    servers: list[str] = []  # more than one: a server stopped answering and the group ran again elsewhere

    async def on(server: Pinned) -> Group:
        servers.append(server.base_url)
        return await run.domain.roll_out(start, server, run.evaluator, group_size=run.cfg.group_size,
                                         params=run.cfg.sampling(start.step_kind), settings=run.cfg.settings())

    group = replace(await run.policy.run_pinned(on), id=group_id)
    if group.step_kind is not start.step_kind:  # the buffer start did not fit: its task was rolled out instead
        run.shortened += 1
        start = start.base()
    if run.embedder is not None:
        bonus = await with_diversity(run.embedder, group.rollouts, run.embed_lock, run.cfg.diversity_norm)
        group = replace(group, rollouts=tuple(bonus))
    run.gate.observe(group.newest.step)
    update = run.curriculum.record(run.store, start, group)
    run.recorded += 1
    run.rollouts += len(group.rollouts)
    run.failed += group.failures
    run.crashed += group.crashed
    run.from_buffer += start.entry is not None
    run.rewards += [r.reward for r in group.rollouts if r.reward is not None]
    _write_metrics(run, start, group, update.score, time.monotonic() - began, servers)


def _write_metrics(run: _Run, start: Start, group: Group, score: float, seconds: float, servers: list[str]) -> None:
    with run.store.view() as buffer:
        scores = [s for _, s in buffer.scores()]
    rewards = [r.reward for r in group.rollouts if r.reward is not None]
    reward_mean = statistics.fmean(rewards) if rewards else None
    run.metrics.write(
        "group", group_id=group.id, task_id=start.task.id, step_kind=start.step_kind.value, depth=start.depth,
        version=str(group.version), version_step=group.version.step,
        staleness=run.gate.current - group.version.step, reward_mean=reward_mean, rewards_scored=len(rewards),
        group_score=score, evaluator_failures=group.failures, evaluator_failures_total=run.failed,
        rollouts_crashed=group.crashed, rollouts_crashed_total=run.crashed,
        buffer_size=len(scores), buffer_score_mean=statistics.fmean(scores) if scores else 0.0,
        buffer_score_max=max(scores, default=0.0), replay_share=run.from_buffer / run.recorded,
        prompt_tokens=group.prompt_tokens, completion_tokens=group.completion_tokens + chains.chain_tokens(start),
        rollouts=len(group.rollouts), truncated=group.truncated, paused_s=round(run.gate.paused_total(), 3),
        seconds=round(seconds, 3),
        # several servers: which one answered, how far apart the servers' versions are, and how far
        # apart the oldest and newest sample of this group are (a reload landed mid-group)
        server=servers[-1], server_attempts=len(servers), version_skew=run.policy.router.skew(),
        group_version_spread=group.newest.step - group.version.step,
    )
    run.bar.set_postfix(reward=f"{reward_mean or 0:.2f}", buffer=len(scores), version=group.version.step,
                        failed=run.failed, refresh=False)
    run.bar.update(1)


async def _worker(run: _Run) -> None:
    while run.more():
        await run.gate.wait(run.stop)
        if not run.more():  # the gate may have waited out a stop, or others filled the quota
            return
        run.started += 1
        await _one_group(run, f"{run.session}-{run.started:05d}")


def _check_run(cfg: CollectConfig, store: CurriculumStore, tasks: list[Task]) -> int:
    """Groups already in the run; refuse a run dir that this config would corrupt."""
    groups = store.groups()
    variants = {g.variant for g in groups} - {cfg.variant}
    if variants:
        raise ConfigError(f"{cfg.run_dir} holds groups of variant {sorted(v.value for v in variants)}, "
                          f"not {cfg.variant.value}: use a new run dir per variant")
    unknown = {e.task_id for e in store.entries()} - {t.id for t in tasks}
    apps = sorted(t for t in unknown if t.startswith(APP_TASK_PREFIX))
    if apps:  # an app fed this run through the recorder: its entries are for the app to improve, not collect
        log.info("app_entries_skipped", app_tasks=len(apps),
                 why="only the app can score answers to its requests: a draw of one starts a base task")
    missing = sorted(unknown - set(apps))
    if missing:
        raise ConfigError(f"the buffer in {cfg.run_dir} has entries for {len(missing)} tasks not in this task set "
                          f"(e.g. {missing[0]}): rerun with the run's own task flags and seed")
    return len(groups)


async def collect(cfg: CollectConfig, policy: Policy, evaluator: Evaluator, store: CurriculumStore,
                  tasks: list[Task], *, embedder: Embedder | None = None, stop: anyio.Event | None = None) -> Summary:
    """Collect groups into ``store`` until the run holds ``cfg.groups`` (or ``stop`` is set).

    ``embedder`` is used for the diversity bonus when the variant has it (full ExIt); the default
    is the packaged MiniLM. ``policy`` may be a ``RoutedPolicy`` over several servers; any other
    policy is routed as the only one. Raises ``ServerError`` when the policy servers are gone for
    good (groups in flight are discarded; recorded ones stay), ``ConfigError`` for a run dir this
    config does not fit, or servers that serve different base models.
    """
    curriculum_cfg = cfg.curriculum()
    existing = _check_run(cfg, store, tasks)
    routed = policy if isinstance(policy, RoutedPolicy) else RoutedPolicy([policy], deadline_s=cfg.server_deadline_s)
    await routed.check_same_base()
    save(cfg, cfg.run_dir, "collect" if not cfg.collector_index else f"collect-{cfg.collector_index}")
    save(curriculum_cfg, cfg.run_dir, "curriculum")
    if curriculum_cfg.diversity_bonus and embedder is None:
        embedder = MiniLMEmbedder()
        await anyio.to_thread.run_sync(embedder.embed, ["load the model now, not mid-run"])
    # a rerun does not replay the same draws (existing), nor does a second collector (its index)
    index = f":{cfg.collector_index}" if cfg.collector_index else ""
    rng = random.Random(f"exitagent-collect:{cfg.seed}{index}:{existing}")
    quota = max(cfg.groups - existing, 0) if cfg.groups else None
    metrics = MetricsFile(collector_metrics(cfg.run_dir), tracker=cfg.open_tracker(cfg.run_dir, "collect"))
    bar = tqdm(total=cfg.groups or None, initial=existing, file=sys.stderr, disable=not cfg.progress,
               desc="groups", dynamic_ncols=True)
    gate = StalenessGate(store, routed, cfg.max_staleness, cfg.poll_s, cfg.max_unconsumed)
    run = _Run(cfg, get_domain(cfg.domain), routed, evaluator, store, Curriculum(curriculum_cfg, tasks, rng), gate,
               stop or anyio.Event(), metrics, bar, embedder if curriculum_cfg.diversity_bonus else None, quota)
    log.info("collect_started", session=run.session, variant=cfg.variant.value, existing=existing, quota=quota)
    try:
        async with anyio.create_task_group() as workers:
            for _ in range(cfg.concurrency):
                workers.start_soon(_worker, run)
    except BaseExceptionGroup as group:
        raise _first_error(group) from None
    finally:
        bar.close()
        metrics.close()
    summary = Summary(
        groups=run.recorded, total_groups=existing + run.recorded, rollouts=run.rollouts,
        failed_rollouts=run.failed, crashed_rollouts=run.crashed, from_buffer=run.from_buffer,
        shortened_starts=run.shortened,
        paused_s=round(run.gate.paused_total(), 3), mean_reward=statistics.fmean(run.rewards) if run.rewards else None,
        stopped=run.stop.is_set() and quota != run.recorded,
    )
    log.info("collect_finished", session=run.session, **{k: v for k, v in vars(summary).items()})
    return summary


def _first_error(group: BaseExceptionGroup[Any]) -> BaseException:
    """The exception a caller should see: ours first (a dead server), else whatever came first."""
    ours, _ = group.split(ExitAgentError)
    error: BaseException = ours or group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


# --- the command line -----------------------------------------------------------------------------


async def _watch_signals(stop: anyio.Event, work: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            if not stop.is_set():
                log.info("collect_stopping", signal=signal.Signals(signum).name, hint="again to discard in-flight")
                stop.set()
            else:
                log.warning("collect_aborted", signal=signal.Signals(signum).name)
                work.cancel()


async def _main(cfg: CollectConfig) -> int:
    tasks = load_tasks(cfg)
    with open_run_store(cfg.run_dir, cfg.store) as store:  # before anything is written: a newer schema stops here
        cfg = replace(cfg, store=redact(cfg.store))  # the saved config never holds a password
        policy = routing.open_servers(cfg.base_url, deadline_s=cfg.server_deadline_s, failover_s=cfg.failover_s,
                                      model=cfg.model, max_context=cfg.max_context)
        async with policy, get_domain(cfg.domain).open_evaluator(cfg.settings()) as evaluator:
            stop, work, summary, error = anyio.Event(), anyio.CancelScope(), None, None
            async with anyio.create_task_group() as group:
                group.start_soon(_watch_signals, stop, work)
                try:
                    with work:
                        summary = await collect(cfg, policy, evaluator, store, tasks, stop=stop)
                except ExitAgentError as failure:
                    error = failure
                group.cancel_scope.cancel()
    if error is not None:
        raise error
    if summary is None:
        print("collect: stopped by a second signal; groups in flight were discarded", file=sys.stderr)
        return ExitCode.INTERRUPTED
    print(f"collect: {summary.groups} groups recorded ({summary.total_groups} in the run), "
          f"{summary.failed_rollouts} failed rollouts ({summary.crashed_rollouts} crashed), "
          f"{summary.from_buffer} from the buffer"
          f"{', stopped early' if summary.stopped else ''}", file=sys.stderr)
    return ExitCode.OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exitagent.collect", description=__doc__.split("\n\n")[0])
    add_arguments(parser, CollectConfig)
    try:
        cfg = from_args(CollectConfig, parse_args(parser, argv, "collect"))
        configure(level=cfg.log_level)
        return anyio.run(_main, cfg)
    except ExitAgentError as error:
        return fail(error, "collect")
    except KeyboardInterrupt:  # a signal before the handlers are installed: nothing was started
        return ExitCode.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
