"""The agent runtime against the real CPU vLLM server: exact tokens, logprobs, versions, real tools."""

from __future__ import annotations

import json

import pytest

from exitagent.client import OpenAIPolicy
from exitagent.loop import EpisodeLimits, run_episode
from exitagent.policy import SamplingParams
from exitagent.tools import PythonTool, Toolbox
from exitagent.types import Message, StopReason, Task
from sandboxes.factory import open_sandbox

pytestmark = [pytest.mark.vllm, pytest.mark.anyio]


async def test_group_of_samples_carries_exact_tokens_and_version(served) -> None:
    async with OpenAIPolicy(served.base_url) as policy:
        samples = await policy.sample([Message("user", "Count to five.")], n=4,
                                      params=SamplingParams(max_tokens=32, temperature=1.0))
        served_version = await policy.policy_version()
    assert len(samples) == 4
    assert len({s.prompt_ids for s in samples}) == 1 and samples[0].prompt_ids
    for sample in samples:
        assert 0 < len(sample.completion_ids) == len(sample.logprobs) <= 32
        assert all(lp <= 0.0 for lp in sample.logprobs)
        assert sample.version == served_version


async def test_three_turn_tool_episode_in_the_local_sandbox(served) -> None:
    call = '<tool>{"name": "python", "arguments": {"code": "print(1)"}}</tool>'
    async with OpenAIPolicy(served.base_url) as policy, open_sandbox() as sandbox:
        tools = Toolbox.of(PythonTool(sandbox))
        # One worked example primes the 135M model to keep calling the tool in the paper's format.
        messages = [Message("system", tools.describe()),
                    Message("user", "Use the python tool three times, printing 1 each time."),
                    Message("assistant", call), Message("tool", "exit code: 0\nstdout:\n1\n", name="python")]
        episode = await run_episode(Task("tool-demo", "demo", messages[1].content), policy, tools, messages,
                                    limits=EpisodeLimits(max_turns=3),
                                    params=SamplingParams(max_tokens=64, temperature=0.0))
    assert episode.stop_reason is StopReason.MAX_TURNS and len(episode.turns) == 3
    for turn in episode.turns:
        (result,) = turn.tool_results
        assert result.content.startswith("exit code: 0") and "1" in result.content  # really ran in bwrap
        assert json.loads(turn.sample.text.split("<tool>")[1].split("</tool>")[0])["name"] == "python"
        assert str(turn.sample.version) == "base"
    (sequence,) = episode.sequences  # each prompt extended the last one: one training sequence
    assert sum(sequence.mask) == sum(len(t.sample.completion_ids) for t in episode.turns)
    assert sequence.tokens[-len(episode.turns[-1].sample.completion_ids):] == episode.turns[-1].sample.completion_ids
