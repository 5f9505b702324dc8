"""A sums helper whose own traffic trains the model behind it.

Users ask for the sum of two numbers; the agent answers, with an ``add`` tool it may call. The app
checks each answer (is the sum in it?) and reports it with ``agent.feedback``; a ``Recorder`` turns
the episodes into groups in RUN's store, which ``training.update`` trains on. The served version is
printed whenever it changes.

    mkdir -p RUN/weights
    python -m exitagent.serve --weights-dir RUN/weights --port 8000 --enforce-eager &   # the policy
    python examples/sums_helper.py http://127.0.0.1:8000/v1 --run-dir RUN --requests 128

Before/after: the app's answers on requests it has not recorded (``--seed 99 --no-record``) before
and after training on what it recorded; the server hot-reloads each checkpoint::

    python examples/sums_helper.py URL --requests 200 --seed 99 --no-record      # before
    python examples/sums_helper.py URL --run-dir RUN --requests 128 --seed 0      # traffic, recorded
    python -m training.update --run-dir RUN --steps 16 --groups-per-step 8 --lr 2e-5 \\
        --max-staleness 1000 --publish-every 1 --idle-timeout-s 30
    python examples/sums_helper.py URL --requests 200 --seed 99 --no-record      # after

Measured with these commands on the packaged 135M model (2026-12-02, 2 cores, AVX512 with native
bf16): 18 of 200 right before (9.0%), 93 of 200 after (46.5%). The recorded traffic had 14 of 128
right; the trainer made 15 updates and then stopped with exit code 3 (idle: no groups left, some
having had one reward for all 8 answers, no signal).

``--max-staleness 1000``: the app's traffic was all answered by the base policy, and the trainer
drops groups more versions old than ``--max-staleness`` (default 4, for a run whose collectors
keep up with it). Traffic recorded first and trained on afterwards is that old by design.

Learning needs a policy that is sometimes right: GRPO learns from the spread of a group's rewards
(``--group-fraction`` of the requests are answered ``--group-size`` times, one answer served).
"""

from __future__ import annotations

import argparse
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import anyio

from exitagent import Recorder, SelfImprovingAgent
from exitagent.errors import ExitAgentError, fail, unwrap
from exitagent.log import configure
from exitagent.policy import TRAINING_TEMPERATURE, SamplingParams

SYSTEM = "You help with sums. Answer with the number."


def add(a: int, b: int) -> int:
    """Add two whole numbers.

    Args:
        a: the first number.
        b: the second number.
    """
    return a + b


def request_for(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def judge(request: str, answer: str) -> float:
    """The app's verdict on an answer to a request it wrote: the sum is one of the answer's numbers
    (the recorder scores a group's other answers with it too)."""
    a, b = map(int, re.findall(r"\d+", request)[:2])
    return float(str(a + b) in re.findall(r"\d+", answer))


def requests_for(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [request_for(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(count)]


@dataclass
class Summary:
    served: int = 0
    right: float = 0.0

    @property
    def mean(self) -> float:
        return self.right / self.served if self.served else 0.0


async def serve(agent: SelfImprovingAgent, requests: list[str], *, record: bool = True,
                quiet: bool = False) -> Summary:
    """Answer each request; with a recorder, report each verdict as feedback."""
    summary = Summary()
    for request in requests:
        reply = await agent.respond(request)
        reward = judge(request, reply.text)
        if record:
            await agent.feedback(reply.episode_id, reward)
        summary.served += 1
        summary.right += reward
        if not quiet:
            print(f"[{reply.version}] {request} {reply.text.strip()[:80]!r} -> {reward:g}")
    return summary


async def watch_versions(agent: SelfImprovingAgent) -> None:
    async for version in agent.versions(interval_s=5.0):
        print(f"serving policy {version}", file=sys.stderr)


async def run(args: argparse.Namespace) -> Summary:
    recorder = None
    if not args.no_record:
        recorder = Recorder(args.run_dir, group_fraction=args.group_fraction, group_size=args.group_size,
                            reward=judge, seed=args.seed)
    agent = SelfImprovingAgent(args.base_url, tools=[add], system_prompt=SYSTEM, max_turns=3,
                               params=SamplingParams(max_tokens=64, temperature=TRAINING_TEMPERATURE),
                               recorder=recorder, deadline_s=args.deadline_s)  # sampled as the policy is trained
    async with agent, anyio.create_task_group() as group:
        group.start_soon(watch_versions, agent)
        version = await agent.policy_version()
        summary = await serve(agent, requests_for(args.requests, args.seed), record=recorder is not None,
                              quiet=args.quiet)
        group.cancel_scope.cancel()
    if recorder is not None:
        left = await recorder.flush()
        recorder.close()
        print(f"recorded into {args.run_dir} ({recorder.pending} answers without a verdict, {left} records spooled)")
    print(f"policy {version}, seed {args.seed}: {summary.right:.0f} of {summary.served} right "
          f"({100 * summary.mean:.1f}%)")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base_url")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/sums"))
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--group-fraction", type=float, default=1.0)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-record", action="store_true", help="measure only (the before and after runs)")
    parser.add_argument("--quiet", action="store_true", help="print the summary only")
    parser.add_argument("--deadline-s", type=float, default=60.0, help="how long to retry a server that fails (s)")
    args = parser.parse_args(argv)
    configure(level="warning")
    try:
        anyio.run(run, args)
    except BaseException as raised:  # a server that went away: one line and exitagent's exit code, no traceback
        error = unwrap(raised)
        if not isinstance(error, ExitAgentError):
            raise
        return fail(error, "sums_helper")
    return 0


if __name__ == "__main__":
    sys.exit(main())
