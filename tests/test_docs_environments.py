"""docs/environments.md: its example module runs as written, selected by --domain, through a group."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from exitagent import Environment
from exitagent.curriculum import Start
from exitagent.domains import DomainSettings, TaskSpec, get_domain
from exitagent.policy import SamplingParams, ScriptedPolicy
from exitagent.types import Message, StepKind

DOC = Path(__file__).resolve().parents[1] / "docs" / "environments.md"


def example_source() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)
    assert len(blocks) == 1, "the page has one Python example; this test runs it"
    return str(blocks[0])


def call(name: str, **arguments: object) -> str:
    return "<tool>" + json.dumps({"name": name, "arguments": arguments}) + "</tool>"


def shopper(messages: Sequence[Message]) -> str:
    """Prices 'pear' (an error it reads), then fills the cart as asked and says the total."""
    request = next(m.content for m in messages if m.role == "user")
    wanted = [(int(n), item) for n, item in re.findall(r"(\d+) (\w+)", request)]
    plays = [call("price", item="pear"), *(call("add_to_cart", item=item, count=n) for n, item in wanted)]
    done = sum(m.role == "assistant" for m in messages)
    if done < len(plays):
        return plays[done]
    prices = {"apple": 0.5, "bread": 2.25, "milk": 1.1}
    return f"The total is {sum(prices[item] * n for n, item in wanted):.2f} euros. <TASK_FINISHED>"


@pytest.mark.anyio
async def test_the_example_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_shop.py").write_text(example_source(), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        env = get_domain("my_shop:ENV")
        assert isinstance(env, Environment)
        task = env.load_tasks(TaskSpec("shop", "train"))[0]
        settings = DomainSettings(max_context=8192)
        async with env.open_evaluator(settings) as evaluator:
            rolled = await env.roll_out(Start(task, StepKind.BASE), ScriptedPolicy(shopper), evaluator, group_size=2,
                                        params=SamplingParams(max_tokens=200), settings=settings)
    finally:
        sys.modules.pop("my_shop", None)
    for rollout in rolled.rollouts:
        assert rollout.reward == 1.0 and rollout.score is not None
        assert rollout.score.components["cart"] == 1.0 and rollout.score.components["total"] == 1.0
        assert rollout.episode.messages[3].content == "error: price raised KeyError: 'pear'"
    assert len(rolled.histories[0]) == 2 * 3 + 1  # three actions, their results, the answer
