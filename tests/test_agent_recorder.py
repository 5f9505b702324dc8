"""The embedded agent with tools and a recorder: multi-turn episodes with the app's typed functions,
recorded groups the trainer's ``items_from`` accepts, feedback errors, the spool, version changes.

A ``ScriptedPolicy`` at the policy seam; the store is a real SQLite store in a temp run directory.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from pathlib import Path

import pytest

from exitagent.agent import FeedbackError, SelfImprovingAgent
from exitagent.curriculum.store import SQLiteStore
from exitagent.errors import ConfigError
from exitagent.policy import ScriptedPolicy
from exitagent.recorder import Recorder
from exitagent.types import Message, PolicyVersion, Score, StepKind, StopReason
from training.config import UpdateConfig
from training.update import items_from

pytestmark = pytest.mark.anyio

NOTES = {"rent": "Rent is 900 a month.", "gym": "The gym opens at 6."}
CALL = '<tool>{"name": "find_note", "arguments": {"topic": "rent"}}</tool>'


def find_note(topic: str) -> str:
    """Look up the user's note on a topic.

    Args:
        topic: one word, e.g. "rent".
    """
    return NOTES.get(topic, "no note on that")


def tool_then_answer(answers: Sequence[str]):
    """A model that calls ``find_note`` first, then answers with the next of ``answers`` in turn."""
    cycle = itertools.cycle(answers)

    def script(messages: Sequence[Message]) -> str:
        return CALL if messages[-1].role != "tool" else next(cycle)

    return script


def agent_with(policy: ScriptedPolicy, **kw: object) -> SelfImprovingAgent:
    return SelfImprovingAgent(policy=policy, tools=[find_note], **kw)  # type: ignore[arg-type]


async def test_respond_runs_a_multi_turn_episode_with_the_apps_tool() -> None:
    policy = ScriptedPolicy(tool_then_answer(["You pay 900."]))
    reply = await agent_with(policy).respond("How much is my rent?")
    assert reply.text == "You pay 900." and reply.stop_reason is StopReason.ANSWERED
    roles = [m.role for m in reply.messages]
    assert roles == ["assistant", "tool", "assistant"] and "Rent is 900" in reply.messages[1].content
    assert "find_note" in policy.calls[0][0].content  # the schema is in the system prompt
    assert reply.version == PolicyVersion(0, "base") and not reply.group_ids


async def test_improve_with_tools_runs_an_episode_per_step() -> None:
    policy = ScriptedPolicy(tool_then_answer(["900", "Your rent is 900 a month."]))
    result = await agent_with(policy).improve("How much is my rent?", steps=1,
                                              evaluator=lambda text: float("a month" in text))
    assert [it.text for it in result.iterates] == ["900", "Your rent is 900 a month."]
    assert result.best is not None and result.best.step == 1
    assert all(it.messages[1].role == "tool" for it in result.iterates)
    improve_prompt = [c for c in policy.calls if c[-1].role == "user"][1][-1].content
    assert "900" in improve_prompt  # the second episode is shown the first answer


async def test_a_sampled_group_becomes_a_group_the_trainer_accepts(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path, group_fraction=1.0, group_size=3, seed=1,
                        reward=lambda request, text: float("900 a month" in text))
    agent = agent_with(ScriptedPolicy(tool_then_answer(["900", "900 a month", "no idea"])), recorder=recorder)
    reply = await agent.respond("How much is my rent?")
    assert len(reply.group_ids) == 2 and recorder.pending == 3
    with SQLiteStore.in_run(tmp_path) as store:
        assert store.groups() == []  # the served answer has no verdict yet
    await agent.feedback(reply.episode_id, Score(0.5, {"helpful": 0.5}))
    assert recorder.pending == 0
    with SQLiteStore.in_run(tmp_path) as store:
        (group,) = store.fetch_groups()
        entries = store.entries()
    assert group.step_kind is StepKind.BASE and len(group.rollouts) == 3
    rewards = [r.reward for r in group.rollouts]
    assert rewards[0] == 0.5 and sorted(rewards[1:]) == [0.0, 1.0]  # served: the app's; others: its function
    for rollout in group.rollouts:
        (sequence,) = rollout.sequences  # tool turns spliced token-faithfully into one sequence
        assert sum(sequence.mask) > 0 and any(lp < 0 for lp in sequence.logprobs)
    items, counts = items_from([group], UpdateConfig(run_dir=tmp_path))
    assert len(items) == 3 and counts["groups_no_signal"] == 0
    # every per-turn prefix of each answer is a start in the ExIt buffer: the three answers, and the
    # tool call they share once (dedup)
    assert len(entries) == 4 and {e.task_id for e in entries} == {group.task_id}


async def test_a_single_answer_becomes_a_start_once_its_feedback_arrives(tmp_path: Path) -> None:
    agent = SelfImprovingAgent(policy=ScriptedPolicy(lambda m: "42"), recorder=Recorder(tmp_path, group_fraction=0))
    reply = await agent.respond("What is 6 * 7?")
    await agent.feedback(reply.episode_id, 1.0)
    with SQLiteStore.in_run(tmp_path) as store:
        (group,) = store.fetch_groups()
        (entry,) = store.entries()
    assert len(group.rollouts) == 1 and entry.iterate == "42" and entry.reward == 1.0
    items, counts = items_from([group], UpdateConfig(run_dir=tmp_path))
    assert items == [] and counts["groups_no_signal"] == 1  # consumed, but one reward has no signal


async def test_feedback_errors_are_clear_and_lose_nothing(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path, group_fraction=0)
    agent = SelfImprovingAgent(policy=ScriptedPolicy(lambda m: "42"), recorder=recorder)
    reply = await agent.respond("What is 6 * 7?")
    with pytest.raises(FeedbackError, match="unknown episode"):
        await agent.feedback("nope", 1.0)
    for bad in (math.nan, "good", None):
        with pytest.raises(FeedbackError, match="finite number or a Score"):
            await agent.feedback(reply.episode_id, bad)  # type: ignore[arg-type]
    assert recorder.pending == 1  # a bad reward changes nothing
    await agent.feedback(reply.episode_id, 1.0)
    with pytest.raises(FeedbackError, match="already recorded"):
        await agent.feedback(reply.episode_id, 0.0)
    with pytest.raises(FeedbackError, match="no recorder"):
        await SelfImprovingAgent(policy=ScriptedPolicy(lambda m: "x")).feedback(reply.episode_id, 1.0)


async def test_a_served_answer_in_a_group_takes_one_verdict(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path, group_fraction=1.0, group_size=2)  # no reward function: the app scores all
    agent = SelfImprovingAgent(policy=ScriptedPolicy(lambda m: "42"), recorder=recorder)
    reply = await agent.respond("What is 6 * 7?")
    await agent.feedback(reply.episode_id, 1.0)
    with pytest.raises(FeedbackError, match="waits for 1 more"):
        await agent.feedback(reply.episode_id, 1.0)
    await agent.feedback(reply.group_ids[0], 0.0)
    with SQLiteStore.in_run(tmp_path) as store:
        assert [r.reward for r in store.fetch_groups()[0].rollouts] == [1.0, 0.0]


async def test_an_unreachable_store_spools_records_and_the_next_call_writes_them(tmp_path: Path) -> None:
    blocker = tmp_path / "elsewhere"
    blocker.write_text("a file where the store's directory should be")
    recorder = Recorder(tmp_path / "run", store=str(blocker / "store.sqlite"), group_fraction=0)
    agent = SelfImprovingAgent(policy=ScriptedPolicy(lambda m: "42"), recorder=recorder)
    for reward in (1.0, 0.0):
        reply = await agent.respond("What is 6 * 7?")  # the app keeps answering
        await agent.feedback(reply.episode_id, reward)
    assert recorder.spooled() == 2 and recorder.pending == 0
    lines = recorder.spool.read_text().splitlines()
    assert [json.loads(line)["rollouts"][0]["reward"] for line in lines] == [1.0, 0.0]
    blocker.unlink()  # the store comes back
    assert await recorder.flush() == 0 and recorder.spooled() == 0
    recorder.close()
    with SQLiteStore(blocker / "store.sqlite") as store:
        assert sorted(r.reward for g in store.fetch_groups() for r in g.rollouts) == [0.0, 1.0]


async def test_a_spool_line_that_is_not_a_record_is_set_aside(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path, group_fraction=0)
    recorder.spool.parent.mkdir(parents=True)
    recorder.spool.write_text('{"torn": \n')
    agent = SelfImprovingAgent(policy=ScriptedPolicy(lambda m: "42"), recorder=recorder)
    reply = await agent.respond("What is 6 * 7?")
    await agent.feedback(reply.episode_id, 1.0)  # the new record is written; the bad line waits aside
    assert recorder.spooled() == 0 and recorder.spool.with_suffix(".bad").read_text() == '{"torn": \n'
    with SQLiteStore.in_run(tmp_path) as store:
        assert len(store.fetch_groups()) == 1


def test_bad_recorder_settings_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="run directory or a store URL"):
        Recorder()
    with pytest.raises(ConfigError, match="group_size"):
        Recorder(tmp_path, group_size=1)
    with pytest.raises(ConfigError, match="spool"):
        Recorder(store="postgresql://localhost/x?schema=app")
    with pytest.raises(ConfigError, match="unsupported store URL"):
        Recorder(tmp_path, store="mysql://db/x")


async def test_the_app_sees_the_version_change() -> None:
    policy = ScriptedPolicy(lambda m: "42")
    agent = SelfImprovingAgent(policy=policy)
    seen: list[PolicyVersion] = []
    async for version in agent.versions(interval_s=0.01):
        seen.append(version)
        if len(seen) == 1:
            policy.version = PolicyVersion.at_step(1)  # the server hot-reloaded
        else:
            break
    assert [str(v) for v in seen] == ["base", "step-000001"]
    assert await agent.policy_version() == PolicyVersion.at_step(1)


async def test_python_true_runs_code_through_the_sandbox_seam(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXITAGENT_SANDBOX", "fake")  # the Sandbox seam's in-memory backend
    run = '<tool>{"name": "python", "arguments": {"code": "print(6 * 7)"}}</tool>'
    policy = ScriptedPolicy(lambda m: run if m[-1].role != "tool" else "It printed 42.")
    async with SelfImprovingAgent(policy=policy, python=True) as agent:
        reply = await agent.respond("Compute 6 * 7 with Python.")
        assert agent._tools is not None and agent._tools.sandbox is not None
    assert reply.messages[1].name == "python" and reply.messages[1].content.startswith("exit code: 0")
    assert agent._tools.sandbox is None  # closed with the agent
    with pytest.raises(ConfigError, match="share a name"):
        SelfImprovingAgent(policy=policy, tools=[find_note, find_note])


async def test_a_failed_answer_takes_no_reward_and_its_group_completes_without_it(tmp_path: Path) -> None:
    def crashes(request: str, text: str) -> float:
        raise RuntimeError("the grader is down")

    recorder = Recorder(tmp_path, group_fraction=1.0, group_size=2, reward=crashes)
    agent = SelfImprovingAgent(policy=ScriptedPolicy(lambda m: "42"), recorder=recorder)
    reply = await agent.respond("What is 6 * 7?")
    with pytest.raises(FeedbackError, match=r"failed .*takes no reward"):
        await agent.feedback(reply.group_ids[0], 1.0)
    await agent.feedback(reply.episode_id, 1.0)
    with SQLiteStore.in_run(tmp_path) as store:
        (group,) = store.fetch_groups()
    assert [r.reward for r in group.rollouts] == [1.0, None]  # left out, never a 0
    assert "RuntimeError" in group.rollouts[1].failure and recorder.pending == 0


async def test_improve_steps_are_recorded_as_groups_that_start_from_the_step_prompt(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path, group_fraction=1.0, group_size=2, seed=1,
                        reward=lambda request, text: float("a month" in text))
    first, better = tool_then_answer(["900", "900 a month"]), tool_then_answer(["Your rent is 900 a month.", "900"])

    def script(messages: Sequence[Message]) -> str:  # step 1's prompt shows the latest iterate, which says 900
        return (better if any("900" in m.content for m in messages if m.role == "user") else first)(messages)

    agent = agent_with(ScriptedPolicy(script), recorder=recorder)
    result = await agent.improve("How much is my rent?", steps=1, evaluator=lambda text: float("a month" in text))
    assert all(it.episode_id and len(it.group_ids) == 1 for it in result.iterates)
    assert recorder.pending == 0  # the evaluator's score is the served answer's reward: no feedback to wait for
    with SQLiteStore.in_run(tmp_path) as store:
        groups = {g.step_kind: g for g in store.fetch_groups()}
        entries = store.entries()
    base, improved = groups[StepKind.BASE], groups[StepKind.IMPROVE]
    assert (base.depth, improved.depth) == (0, 1) and base.task_id == improved.task_id
    assert sorted(r.reward for r in improved.rollouts) == [0.0, 1.0]  # type: ignore[type-var]
    assert improved.rollouts[0].reward == result.iterates[1].score  # the served answer: the evaluator's verdict
    (sequence,) = improved.rollouts[0].sequences
    prompt = "".join(chr(t) for t, m in zip(sequence.tokens, sequence.mask, strict=True) if not m)
    assert result.iterates[0].text in prompt and "How much is my rent?" in prompt  # request and last iterate
    with pytest.raises(FeedbackError, match="already recorded"):
        await agent.feedback(result.iterates[1].episode_id, 1.0)
    items, counts = items_from(list(groups.values()), UpdateConfig(run_dir=tmp_path))
    assert len(items) == 4 and counts["groups_no_signal"] == 0
    assert any(e.iterate.endswith("900 a month.") and e.step_kind is StepKind.IMPROVE for e in entries)


async def test_improve_without_an_evaluator_waits_for_the_apps_feedback(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path, group_fraction=0)
    agent = SelfImprovingAgent(policy=ScriptedPolicy(lambda m: "42"), recorder=recorder)
    result = await agent.improve("What is 6 * 7?", steps=1, mode="diverge")
    assert recorder.pending == 2
    for iterate in result.iterates:
        await agent.feedback(iterate.episode_id, 1.0)
    with SQLiteStore.in_run(tmp_path) as store:
        kinds = sorted((g.step_kind.value, g.depth) for g in store.fetch_groups())
    assert kinds == [("base", 0), ("diverge", 1)]
