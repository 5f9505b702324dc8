"""The embedded agent learning from its app, end to end on the CPU: a real server answers with a tool,
the app's feedback turns recorded episodes into groups, ``python -m training.update`` trains on
them and publishes, the server hot-reloads, and the app sees the new version."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import anyio
import pytest

from exitagent import Recorder, SelfImprovingAgent
from exitagent.curriculum.store import SQLiteStore
from exitagent.policy import SamplingParams
from exitagent.serving.launch import ServeProcess
from training.config import UpdateConfig
from training.update import items_from

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.anyio]
ROOT = Path(__file__).resolve().parents[2]
SYSTEM = ('Answer with the note. First call the tool, exactly like this:\n'
          '<tool>{"name": "find_note", "arguments": {"topic": "rent"}}</tool>')


def find_note(topic: str) -> str:
    """Look up the user's note on a topic.

    Args:
        topic: one word, e.g. "rent".
    """
    return {"rent": "Rent is 900 a month."}.get(topic, "no note on that")


def graded(request: str, text: str) -> float:
    """A reward that differs between answers (their length modulo 10), so a group of four carries a
    signal (all four equal: about one in a thousand). What is learnt does not matter here, only the flow."""
    return (len(text) % 10) / 9


@pytest.fixture
def own_server(tmp_path: Path, serve_factory) -> Iterator[ServeProcess]:
    """A server of its own: the hot reload here must not change what the session's server serves."""
    server = serve_factory(tmp_path / "run")
    yield server
    server.stop()


async def test_app_feedback_trains_the_policy_and_the_app_sees_the_reload(own_server: ServeProcess) -> None:
    run_dir = own_server.weights_dir.parent
    recorder = Recorder(run_dir, group_fraction=1.0, group_size=4, reward=graded, seed=0)
    agent = SelfImprovingAgent(own_server.base_url, tools=[find_note], system_prompt=SYSTEM, max_turns=2,
                               params=SamplingParams(max_tokens=48, temperature=1.0), recorder=recorder)
    async with agent:
        before = await agent.policy_version()
        for _ in range(2):
            reply = await agent.respond("What does my note about rent say?")
            assert reply.version == before and len(reply.group_ids) == 3
            await agent.feedback(reply.episode_id, graded("", reply.text))
        with SQLiteStore.in_run(run_dir) as store:
            groups = store.fetch_groups()
        assert len(groups) == 2 and all(len(g.rollouts) == 4 for g in groups)
        calls = sum("<tool>" in r.text or "find_note" in r.text for g in groups for r in g.rollouts)
        print(f"answers that called the tool: {calls} of 8")
        for rollout in (r for g in groups for r in g.rollouts):
            assert rollout.sequences and all(sum(s.mask) > 0 for s in rollout.sequences)
        items, counts = items_from(groups, UpdateConfig(run_dir=run_dir))
        assert items and counts["groups_no_signal"] == 0  # what the trainer will learn from

        command = [sys.executable, "-m", "training.update", "--run-dir", str(run_dir), "--steps", "1",
                   "--groups-per-step", "2", "--lr", "1e-5", "--idle-timeout-s", "120", "--quiet"]
        done = await anyio.to_thread.run_sync(partial(
            subprocess.run, command, cwd=ROOT, capture_output=True, text=True, timeout=900,
            env={**os.environ, "PYTHONPATH": str(ROOT)}))
        assert done.returncode == 0, done.stderr[-3000:]
        with SQLiteStore.in_run(run_dir) as store:
            assert all(g.consumed_by_step == 1 for g in store.groups())

        with anyio.fail_after(180):
            async for version in agent.versions(interval_s=1.0):
                if version.step == 1:
                    break
        reply = await agent.respond("What does my note about rent say?")
        assert reply.version.step == 1  # the next answer comes from the trained weights
