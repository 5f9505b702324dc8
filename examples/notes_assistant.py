"""A notes assistant whose own traffic trains the model behind it.

Users ask about their notes; the agent answers with a ``find_note`` tool. The app judges each
answer the way a user's thumbs-up would (does it state the fact the note holds?) and reports it
with ``agent.feedback``; a ``Recorder`` turns the episodes into groups in RUN's store, which
``training.update`` trains on. The served version is printed whenever it changes.

    mkdir -p RUN/weights
    python -m exitagent.serve --weights-dir RUN/weights --port 8000 &       # the policy
    python examples/notes_assistant.py http://127.0.0.1:8000/v1 --run-dir RUN --requests 64

Before/after: run the app once (its mean reward is the "before"), train on what it recorded, let
the server hot-reload, run it again::

    python examples/notes_assistant.py URL --run-dir RUN --requests 64            # before, and data
    python -m training.update --run-dir RUN --steps 8 --groups-per-step 4 --publish-every 8 --lr 1e-5
    python examples/notes_assistant.py URL --run-dir RUN --requests 64 --no-record  # after

Learning needs a policy that is sometimes right: GRPO learns from the spread of a group's rewards.
The packaged 135M model is not (measured 2026-12-02: 1 of 64 answers right, and 0 of 32 at the
training temperature; it never calls the tool), so every recorded group has one reward and
``training.update`` consumes them as "no signal" without an update. Use a model that follows tool
formats (``exitagent.serve --model``, e.g. a 1.5B-3B instruct model) for the measurement.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio

from exitagent import Recorder, SelfImprovingAgent
from exitagent.errors import ExitAgentError, fail, unwrap
from exitagent.log import configure
from exitagent.policy import TRAINING_TEMPERATURE, SamplingParams

NOTES = {
    "rent": "Rent is 900 dollars, due on the 1st.", "gym": "The gym opens at 6 am.",
    "dentist": "The dentist appointment is on Tuesday.", "wifi": "The wifi password is tulip42.",
    "bus": "The 14 bus leaves at 8:10.", "plants": "Water the plants on Sunday.",
}
FACTS = {"rent": "900", "gym": "6", "dentist": "Tuesday", "wifi": "tulip42", "bus": "8:10", "plants": "Sunday"}
SYSTEM = "You answer questions about the user's notes. Look the note up with the tool, then answer in one sentence."


def find_note(topic: str) -> str:
    """Look up the user's note on a topic.

    Args:
        topic: one word: rent, gym, dentist, wifi, bus or plants.
    """
    return NOTES.get(topic.lower().strip(), f"no note on {topic!r}; topics: {', '.join(NOTES)}")


def thumbs_up(topic: str, answer: str) -> float:
    """The app's verdict: the answer states the fact the note holds."""
    return float(FACTS[topic].lower() in answer.lower())


def request_for(topic: str) -> str:
    return f"What does my note about {topic} say?"


def judge(request: str, answer: str) -> float:
    """``thumbs_up`` for a request this app wrote (the recorder scores a group's other answers with it)."""
    return thumbs_up(next(t for t in NOTES if request == request_for(t)), answer)


@dataclass
class Summary:
    served: int = 0
    rewarded: float = 0.0

    @property
    def mean(self) -> float:
        return self.rewarded / self.served if self.served else 0.0


async def serve(agent: SelfImprovingAgent, topics: Sequence[str], *, record: bool = True) -> Summary:
    """Answer one request per topic; with a recorder, report each verdict as feedback."""
    summary = Summary()
    for topic in topics:
        reply = await agent.respond(request_for(topic))
        reward = thumbs_up(topic, reply.text)
        if record:
            await agent.feedback(reply.episode_id, reward)
        summary.served += 1
        summary.rewarded += reward
        print(f"[{reply.version}] {topic}: {reply.text.strip()[:100]!r} -> {reward:g}")
    return summary


async def watch_versions(agent: SelfImprovingAgent) -> None:
    async for version in agent.versions(interval_s=5.0):
        print(f"serving policy {version}", file=sys.stderr)


def topics_for(requests: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(sorted(NOTES)) for _ in range(requests)]


async def run(args: argparse.Namespace) -> Summary:
    recorder = None
    if not args.no_record:
        recorder = Recorder(args.run_dir, group_fraction=args.group_fraction, group_size=args.group_size,
                            reward=judge)
    agent = SelfImprovingAgent(args.base_url, tools=[find_note], system_prompt=SYSTEM, max_turns=3,
                               params=SamplingParams(max_tokens=96, temperature=TRAINING_TEMPERATURE),
                               recorder=recorder)  # sampled as the policy is trained
    async with agent, anyio.create_task_group() as group:
        group.start_soon(watch_versions, agent)
        summary = await serve(agent, topics_for(args.requests, args.seed), record=recorder is not None)
        group.cancel_scope.cancel()
    if recorder is not None:
        left = await recorder.flush()
        recorder.close()
        print(f"recorded into {args.run_dir} ({recorder.pending} answers without a verdict, {left} records spooled)")
    print(f"mean reward {summary.mean:.3f} over {summary.served} requests")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base_url")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/notes"))
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--group-fraction", type=float, default=0.5)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-record", action="store_true", help="measure only (the 'after' run)")
    args = parser.parse_args(argv)
    configure(level="warning")
    try:
        anyio.run(run, args)
    except BaseException as raised:  # a server that went away: one line and exitagent's exit code, no traceback
        error = unwrap(raised)
        if not isinstance(error, ExitAgentError):
            raise
        return fail(error, "notes_assistant")
    return 0


if __name__ == "__main__":
    sys.exit(main())
