"""What a sandbox costs per run, and whether it leaks: ``local`` (and ``process``) against a bare
subprocess running the same ``python -c pass``, side by side, runs interleaved so that drift in the
machine's load hits every column alike.

    .venv/bin/python benchmarks/sandbox.py            # 1,000 runs each (about two minutes here)
    .venv/bin/python benchmarks/sandbox.py --runs 100

Targets: median overhead of ``local`` <= +30 ms over the bare run, and 0 processes left behind
(every sandboxed run carries a token in its environment; afterwards ``/proc`` is searched for it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

import _machine
import anyio
import structlog

from sandboxes.base import Limits
from sandboxes.cgroups import current_hierarchy
from sandboxes.factory import open_sandbox

COMMAND = [sys.executable, "-c", "pass"]
TARGET_OVERHEAD_MS = 30.0


def leaked(token: str) -> int:
    marker = f"EXITAGENT_BENCH_TOKEN={token}".encode()
    count = 0
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and marker in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                count += 1
        except OSError:
            continue
    return count


def cgroup_leftovers() -> int:
    parents = set(current_hierarchy().parents.values())
    return sum(len(list(p.glob(f"exitagent-{os.getpid()}-*"))) for p in parents)


async def bare_run(token: str) -> float:
    started = time.perf_counter()
    done = await anyio.run_process(COMMAND, env={"EXITAGENT_BENCH_TOKEN": token}, check=False)
    assert done.returncode == 0
    return time.perf_counter() - started


async def measure(runs: int, backends: list[str]) -> dict[str, list[float]]:
    token = uuid.uuid4().hex
    times: dict[str, list[float]] = {"bare": [], **{b: [] for b in backends}}
    env = {"EXITAGENT_BENCH_TOKEN": token}
    sandboxes = {b: await open_sandbox(b, limits=Limits(wall_s=30), env=env) for b in backends}
    try:
        for _ in range(runs):
            times["bare"].append(await bare_run(token))
            for name, sbx in sandboxes.items():
                started = time.perf_counter()
                result = await sbx.exec(COMMAND)
                times[name].append(time.perf_counter() - started)
                assert result.ok, result
    finally:
        for sbx in sandboxes.values():
            await sbx.close()
    times["_leaked"] = [float(leaked(token)), float(cgroup_leftovers())]
    return times


def report(times: dict[str, list[float]], runs: int) -> bool:
    leaked_procs, leaked_cgroups = (int(x) for x in times.pop("_leaked"))
    bare = statistics.median(times["bare"]) * 1000
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{runs} runs of `python -c pass` each, interleaved; {os.cpu_count()} cores; load average {load}")
    # p10 is what a run costs when the machine is quiet; the median is what the target is about.
    bare_p10 = sorted(times["bare"])[int(0.1 * (len(times["bare"]) - 1))] * 1000
    print(f"{'runner':<10}{'median ms':>11}{'p10 ms':>9}{'p90 ms':>9}{'overhead ms':>13}{'p10 overhead':>14}")
    for name, samples in times.items():
        ms = sorted(s * 1000 for s in samples)
        median, p10, p90 = statistics.median(ms), ms[int(0.1 * (len(ms) - 1))], ms[int(0.9 * (len(ms) - 1))]
        print(f"{name:<10}{median:>11.1f}{p10:>9.1f}{p90:>9.1f}{median - bare:>+13.1f}{p10 - bare_p10:>+14.1f}")
    local_overhead = statistics.median(times["local"]) * 1000 - bare if "local" in times else 0.0
    print(f"processes left behind: {leaked_procs}; run cgroups left behind: {leaked_cgroups}")
    ok = local_overhead <= TARGET_OVERHEAD_MS and leaked_procs == 0 and leaked_cgroups == 0
    print(f"targets (local overhead <= +{TARGET_OVERHEAD_MS:.0f} ms, 0 leaked): {'met' if ok else 'MISSED'}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--backends", nargs="+", default=["local", "process"], choices=["local", "process"])
    args = parser.parse_args()
    _machine.print_machine()
    # The process backend logs a warning per sandbox; keep the figures readable.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    times = anyio.run(measure, args.runs, args.backends)
    sys.exit(0 if report(times, args.runs) else 1)


if __name__ == "__main__":
    main()
