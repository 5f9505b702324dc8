"""The agent loop with a scripted policy: every stop reason, tool errors fed back, token records."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace

import pytest

from exitagent.loop import EpisodeLimits, run_episode, run_group
from exitagent.policy import SamplingParams, ScriptedPolicy
from exitagent.records import token_sequences
from exitagent.tools import PythonTool, Toolbox, parse_action
from exitagent.types import Message, PolicyVersion, Sample, StopReason, Task, Turn
from sandboxes.base import ExecResult
from sandboxes.fake import FakeSandbox

pytestmark = pytest.mark.anyio

TASK = Task("t1", "demo", "Compute 6 * 7 with python.")
START = (Message("user", TASK.prompt),)


def call(code: str) -> str:
    return f'<tool>{json.dumps({"name": "python", "arguments": {"code": code}})}</tool>'


def toolbox(*outputs: str) -> tuple[Toolbox, FakeSandbox]:
    sandbox = FakeSandbox(results=[ExecResult(out, "", 0) for out in outputs])
    return Toolbox.of(PythonTool(sandbox)), sandbox


async def test_tool_call_then_answer() -> None:
    tools, sandbox = toolbox("42\n")
    policy = ScriptedPolicy([call("print(6 * 7)"), "The answer is 42."])
    episode = await run_episode(TASK, policy, tools, START)
    assert episode.stop_reason is StopReason.ANSWERED
    assert [m.role for m in episode.messages] == ["user", "assistant", "tool", "assistant"]
    assert "42" in episode.messages[2].content and sandbox.calls
    assert episode.metrics["turns"] == 2 and episode.metrics["tool_calls"] == 1


@pytest.mark.parametrize(("answer", "reason"), [("Done. <TASK_FINISHED>", StopReason.FINISHED),
                                                ("I cannot. <TASK_ERROR>", StopReason.GAVE_UP)])
async def test_stop_markers(answer: str, reason: StopReason) -> None:
    episode = await run_episode(TASK, ScriptedPolicy([answer]), toolbox()[0], START)
    assert episode.stop_reason is reason


async def test_tool_mistakes_are_fed_back_and_counted() -> None:
    script = ['<tool>{"name": "python", "arguments": </tool>',  # bad JSON
              '<tool>{"name": "shell", "arguments": {}}</tool>',  # unknown tool
              '<tool>{"name": "python", "arguments": {"cmd": "ls"}}</tool>',  # bad arguments
              "ok <TASK_FINISHED>"]
    episode = await run_episode(TASK, ScriptedPolicy(script), toolbox()[0], START)
    tool_messages = [m.content for m in episode.messages if m.role == "tool"]
    assert "invalid JSON" in tool_messages[0]
    assert "unknown tool 'shell'" in tool_messages[1]
    assert "missing arguments ['code']" in tool_messages[2]
    assert episode.metrics["tool_error_bad_json"] == 1
    assert episode.metrics["tool_error_unknown_tool"] == 1
    assert episode.metrics["tool_error_bad_arguments"] == 1
    assert episode.stop_reason is StopReason.FINISHED


async def test_max_turns() -> None:
    tools, _ = toolbox(*["1\n"] * 5)
    episode = await run_episode(TASK, ScriptedPolicy([call("print(1)")] * 5), tools, START,
                                limits=EpisodeLimits(max_turns=3))
    assert episode.stop_reason is StopReason.MAX_TURNS and len(episode.turns) == 3


async def test_total_token_budget() -> None:
    tools, _ = toolbox(*["1\n"] * 5)
    episode = await run_episode(TASK, ScriptedPolicy([call("print(1)")] * 5), tools, START,
                                limits=EpisodeLimits(max_total_tokens=100, min_turn_tokens=16))
    assert episode.stop_reason is StopReason.MAX_TOKENS
    assert episode.metrics["completion_tokens"] <= 100


async def test_context_full_stops_before_overflowing() -> None:
    tools, _ = toolbox(*["x" * 300] * 5)
    policy = ScriptedPolicy([call("print('x' * 300)")] * 5, max_context=400)
    episode = await run_episode(TASK, policy, tools, START)
    assert episode.stop_reason is StopReason.CONTEXT_FULL
    for turn in episode.turns:  # no request ever exceeded the context
        assert len(turn.sample.prompt_ids) + len(turn.sample.completion_ids) <= 400


async def test_truncated_answer() -> None:
    episode = await run_episode(TASK, ScriptedPolicy(["x" * 50]), toolbox()[0], START,
                                params=SamplingParams(max_tokens=20))
    assert episode.stop_reason is StopReason.TRUNCATED


async def test_wall_clock() -> None:
    class Slow:
        max_context = 4096

        async def sample(self, messages: Sequence[Message], **_: object) -> list[Sample]:
            import anyio

            await anyio.sleep(10)
            raise AssertionError("not reached")

        def estimate_tokens(self, text: str) -> int:
            return len(text)

    episode = await run_episode(TASK, Slow(), toolbox()[0], START, limits=EpisodeLimits(wall_s=0.2))
    assert episode.stop_reason is StopReason.WALL_CLOCK and not episode.turns


async def test_group_is_one_request_then_independent_episodes() -> None:
    answers = iter([call("print(1)"), call("print(2)"), "one", "two"])
    policy = ScriptedPolicy(lambda messages: next(answers))
    tools, _ = toolbox("1\n", "2\n")
    episodes = await run_group(TASK, policy, tools, START, n=2)
    assert len(episodes) == 2 and all(e.stop_reason is StopReason.ANSWERED for e in episodes)
    assert len(policy.calls) == 3  # one n=2 request for the first turns, then one per episode


async def test_records_mask_tool_tokens_and_keep_behaviour_logprobs() -> None:
    tools, _ = toolbox("42\n")
    episode = await run_episode(TASK, ScriptedPolicy([call("print(6 * 7)"), "42"]), tools, START)
    (sequence,) = episode.sequences
    first, second = episode.turns[0].sample, episode.turns[1].sample
    assert sequence.tokens == second.prompt_ids + second.completion_ids
    assert sum(sequence.mask) == len(first.completion_ids) + len(second.completion_ids)
    sampled = [lp for lp, m in zip(sequence.logprobs, sequence.mask, strict=True) if m]
    assert sampled == list(first.logprobs + second.logprobs)
    # the tool result's tokens sit between the two completions and are masked out
    start = len(first.prompt_ids) + len(first.completion_ids)
    assert sequence.mask[start: len(second.prompt_ids)] == (0,) * (len(second.prompt_ids) - start)


async def test_records_start_a_new_sequence_when_the_prompt_does_not_extend() -> None:
    tools, _ = toolbox("42\n")
    policy = ScriptedPolicy([call("print(6 * 7)"), "42"], break_prefix=True)
    episode = await run_episode(TASK, policy, tools, START)
    assert len(episode.sequences) == 2
    assert episode.sequences[1].tokens[: len(episode.turns[1].sample.prompt_ids)] == episode.turns[1].sample.prompt_ids


def test_records_take_the_oldest_version_and_check_lengths() -> None:
    def sample(prompt: tuple[int, ...], out: tuple[int, ...], step: int) -> Sample:
        return Sample("", prompt, out, tuple(-1.0 for _ in out), "stop", PolicyVersion.at_step(step))

    (sequence,) = token_sequences([Turn(sample((1, 2), (3,), 5)), Turn(sample((1, 2, 3, 9), (4,), 4))])
    assert sequence.tokens == (1, 2, 3, 9, 4) and sequence.mask == (0, 0, 1, 0, 1)
    assert sequence.version.step == 4
    with pytest.raises(ValueError, match="logprobs"):
        token_sequences([Turn(Sample("", (1,), (2, 3), (-1.0,), "stop", PolicyVersion.at_step(0)))])


def test_parse_action_formats() -> None:
    action = parse_action('a <tool>[{"name": "f", "arguments": {"x": 1}}, {"name": "g"}]</tool> <TASK_FINISHED>')
    assert [c.name for c in action.calls] == ["f", "g"] and action.finished and not action.parse_errors
    assert parse_action('<tool>{"arguments": {}}</tool>').parse_errors


async def test_group_whose_prompt_leaves_no_room_stops_without_a_request() -> None:
    policy = ScriptedPolicy(["never"], max_context=64)
    episodes = await run_group(TASK, policy, toolbox()[0], [Message("user", "x" * 200)], n=3)
    assert [e.stop_reason for e in episodes] == [StopReason.CONTEXT_FULL] * 3 and not policy.calls


async def test_group_first_turn_is_capped_by_the_room_left() -> None:
    policy = ScriptedPolicy(lambda messages: "y" * 500, max_context=300)
    (episode,) = await run_group(TASK, policy, toolbox()[0], [Message("user", "x" * 100)], n=1)
    sample = episode.turns[0].sample
    assert len(sample.prompt_ids) + len(sample.completion_ids) <= 300
    assert episode.stop_reason is StopReason.CONTEXT_FULL


async def test_calls_per_turn_runs_only_the_last_calls_of_a_message() -> None:
    tools, sandbox = toolbox("second\n")
    tools.calls_per_turn = 1
    policy = ScriptedPolicy([call("print('first')") + " " + call("print('second')"), "done"])
    episode = await run_episode(TASK, policy, tools, START)
    first, second = episode.messages[2], episode.messages[3]
    assert "one action per turn" in first.content and "second" in second.content
    assert len(sandbox.calls) == 1 and episode.metrics["tool_error_extra_call"] == 1


async def test_require_action_answers_a_message_without_one_and_goes_on() -> None:
    tools, _ = toolbox()
    policy = ScriptedPolicy(["Let me think.", "<TASK_FINISHED>"])
    episode = await run_episode(TASK, policy, replace(tools, require_action=True), START)
    assert episode.stop_reason is StopReason.FINISHED and len(episode.turns) == 2
    assert episode.messages[2].name == "no_action" and episode.metrics["tool_error_no_action"] == 1
    plain = await run_episode(TASK, ScriptedPolicy(["Let me think."]), tools, START)
    assert plain.stop_reason is StopReason.ANSWERED and len(plain.turns) == 1  # the default is unchanged
