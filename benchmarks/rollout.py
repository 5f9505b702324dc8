"""Rollout throughput: generated tokens/s through the agent loop vs direct requests, same server.

    .venv/bin/python benchmarks/rollout.py [--base-url URL] [--concurrency 8] [--requests 32]

Without ``--base-url`` it starts ``exitagent.serve`` on the packaged model first. Both sides send
the same chat request (one user message, 128 new tokens at most, temperature 1, token ids and
logprobs on) with the same concurrency; "direct" posts raw JSON with httpx, "loop" runs
``exitagent.loop.run_episode`` through ``OpenAIPolicy`` (parsing, records, retries and all).
Rounds alternate between the two so drift in the machine's load hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import _machine
import anyio
import httpx

from exitagent.client import OpenAIPolicy
from exitagent.loop import run_episode
from exitagent.policy import SamplingParams
from exitagent.serving import launch
from exitagent.tools import Toolbox
from exitagent.types import Message, Task

PROMPTS = [f"Write a short story about a robot who learns the number {i}." for i in range(64)]
PARAMS = SamplingParams(max_tokens=128, temperature=1.0)


async def run_many(concurrency: int, requests: int, one) -> float:
    """Tokens per second over ``requests`` calls of ``one(i) -> tokens`` with ``concurrency`` in flight."""
    limiter = anyio.CapacityLimiter(concurrency)
    tokens = 0

    async def worker(i: int) -> None:
        nonlocal tokens
        async with limiter:
            tokens += await one(i)

    started = time.perf_counter()
    async with anyio.create_task_group() as group:
        for i in range(requests):
            group.start_soon(worker, i)
    return tokens / (time.perf_counter() - started)


async def measure(base_url: str, concurrency: int, requests: int, rounds: int) -> None:
    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http, OpenAIPolicy(base_url) as policy:
        async def direct(i: int) -> int:
            body = {"model": "policy", "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                    "max_tokens": PARAMS.max_tokens, "temperature": PARAMS.temperature, "logprobs": True,
                    "return_token_ids": True}
            response = await http.post(f"{base_url}/chat/completions", json=body)
            response.raise_for_status()
            return len(response.json()["choices"][0]["token_ids"])

        async def loop(i: int) -> int:
            task = Task(str(i), "bench", PROMPTS[i % len(PROMPTS)])
            episode = await run_episode(task, policy, Toolbox(), [Message("user", task.prompt)], params=PARAMS)
            return sum(len(t.sample.completion_ids) for t in episode.turns)

        await run_many(concurrency, concurrency, direct)  # warm-up
        results: dict[str, list[float]] = {"direct": [], "loop": []}
        for round_index in range(rounds):
            for name, one in (("direct", direct), ("loop", loop))[:: 1 if round_index % 2 == 0 else -1]:
                results[name].append(await run_many(concurrency, requests, one))
                print(f"round {round_index + 1} {name:6s}: {results[name][-1]:7.1f} tok/s", flush=True)
    direct_tps, loop_tps = statistics.median(results["direct"]), statistics.median(results["loop"])
    print(f"\nconcurrency {concurrency}, {requests} requests x {rounds} rounds, max 128 new tokens:")
    print(f"direct requests {direct_tps:.1f} tok/s | agent loop {loop_tps:.1f} tok/s | "
          f"ratio loop/direct {loop_tps / direct_tps:.2f}x (target >= 0.9x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    _machine.print_machine()  # of this machine: with --base-url the server may be elsewhere
    if args.base_url:
        anyio.run(measure, args.base_url, args.concurrency, args.requests, args.rounds)
        return
    with tempfile.TemporaryDirectory() as tmp:
        print("starting serve (vLLM on the CPU takes a minute or two) ...", flush=True)
        server = launch.start_serve(Path(tmp), "--kv-cache-gib", "2")
        try:
            anyio.run(measure, server.base_url, args.concurrency, args.requests, args.rounds)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
