"""Collector throughput with one server and with two: groups per minute, same run, same collector.

    .venv/bin/python benchmarks/fleet.py [--groups 12] [--rounds 2] [--concurrency 4] [--bind-cores]
    .venv/bin/python benchmarks/fleet.py --base-url URL_A --base-url URL_B     # servers already running

Without ``--base-url`` it starts two ``exitagent.serve`` processes on the packaged model and one
weights directory (each with a 1 GiB KV cache; ~8-10 GiB of memory). Each round runs
``exitagent.collect.collect`` (GRPO variant: no curriculum or diversity bonus in the way, G = 4,
64 new tokens, arithmetic) into a fresh run directory, once routed over the first server only and
once over both, alternating the order so drift in the machine's load hits both alike. The figure
is groups recorded per minute of wall time, and the store's share of it (time inside
``Curriculum.record``) per group.

On the CPU build, vLLM binds each engine's OpenMP threads to one core and keeps the rest for other
work (``VLLM_CPU_OMP_THREADS_BIND=auto``); two servers on a two-core machine then share a core
unless ``--bind-cores`` pins the first server to core 0 and the second to core 1. Either way two
servers on two cores compete with each other and with the collector: the figure says what routing
costs or gains on this machine, not what two GPU nodes would do.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import _machine
import anyio

from evaluators.math import MathEvaluator
from exitagent import curriculum, routing
from exitagent.collect import CollectConfig, collect, load_tasks
from exitagent.curriculum.store import SQLiteStore
from exitagent.log import configure
from exitagent.serving import launch
from exitagent.types import Variant


class StoreClock:
    """Wall time spent recording groups in the store (``Curriculum.record``), summed over a round."""

    def __init__(self) -> None:
        self.seconds, self._original = 0.0, curriculum.Curriculum.record

    def __enter__(self) -> StoreClock:
        clock, original = self, self._original

        def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                clock.seconds += time.perf_counter() - started

        curriculum.Curriculum.record = timed  # type: ignore[method-assign]
        return self

    def __exit__(self, *_: object) -> None:
        curriculum.Curriculum.record = self._original  # type: ignore[method-assign]


async def one_round(urls: list[str], groups: int, concurrency: int) -> tuple[float, float]:
    """(groups per minute, store milliseconds per group) of one collect over ``urls``."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = CollectConfig(run_dir=Path(tmp), base_url=tuple(urls), variant=Variant.GRPO, groups=groups,
                            group_size=4, concurrency=concurrency, max_tokens=64, levels="add1,add2",
                            num_tasks=100, progress=False, log_level="warning", max_staleness=1000)
        policy = routing.open_servers(cfg.base_url, deadline_s=120.0, failover_s=30.0, max_context=cfg.max_context)
        async with policy, MathEvaluator() as evaluator:
            with SQLiteStore.in_run(cfg.run_dir) as store, StoreClock() as clock:
                started = time.perf_counter()
                summary = await collect(cfg, policy, evaluator, store, load_tasks(cfg))
                elapsed = time.perf_counter() - started
    return 60 * summary.groups / elapsed, 1000 * clock.seconds / max(summary.groups, 1)


async def measure(urls: list[str], groups: int, concurrency: int, rounds: int) -> None:
    setups = {"1 server": urls[:1], f"{len(urls)} servers": urls}
    await one_round(urls, concurrency, concurrency)  # warm-up: both servers' first requests
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in setups}
    for index in range(rounds):
        for name, chosen in list(setups.items())[:: 1 if index % 2 == 0 else -1]:
            results[name].append(await one_round(chosen, groups, concurrency))
            rate, store_ms = results[name][-1]
            print(f"round {index + 1} {name:10s}: {rate:6.2f} groups/min, store {store_ms:6.1f} ms/group", flush=True)
    print(f"\n{groups} groups per round (G = 4, 64 new tokens), {concurrency} groups in flight, {rounds} rounds:")
    for name, values in results.items():
        rate = statistics.median(v[0] for v in values)
        store_ms = statistics.median(v[1] for v in values)
        print(f"{name:10s}: {rate:6.2f} groups/min (median), store {store_ms:.1f} ms per group")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", action="append", help="a running server (give two or more)")
    parser.add_argument("--groups", type=int, default=12)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--bind-cores", action="store_true", help="CPU build: server i on core i")
    args = parser.parse_args()
    configure(level="warning")  # the figures, not every collector event
    _machine.print_machine()
    if args.base_url:
        anyio.run(measure, args.base_url, args.groups, args.concurrency, args.rounds)
        return
    with tempfile.TemporaryDirectory() as tmp:
        print(f"starting two servers on one weights directory (bind cores: {args.bind_cores}) ...", flush=True)
        servers = []
        try:
            for index in range(2):
                env = {"VLLM_CPU_OMP_THREADS_BIND": str(index)} if args.bind_cores else {}
                servers.append(launch.start_serve(Path(tmp), "--kv-cache-gib", "1", "--log-file",
                                                  str(Path(tmp) / f"vllm-{index}.log"), env=env))
            anyio.run(measure, [s.base_url for s in servers], args.groups, args.concurrency, args.rounds)
        finally:
            for server in servers:
                server.stop()


if __name__ == "__main__":
    main()
