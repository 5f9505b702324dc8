"""examples/sums_helper.py with a short budget: its requests are answered with the tool, its
verdicts recorded, and the groups it feeds the run are ones the trainer learns from."""

from __future__ import annotations

import importlib.util
import itertools
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import pytest

from exitagent import Recorder, SelfImprovingAgent
from exitagent.curriculum.store import SQLiteStore
from exitagent.policy import ScriptedPolicy
from exitagent.types import Message
from training.config import UpdateConfig
from training.update import items_from

pytestmark = pytest.mark.anyio
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sums_helper.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sums_helper", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def half_right_model() -> Callable[[Sequence[Message]], str]:
    """Says what the tool returned; of the answers sampled together, the first adds the request's
    numbers and the second adds one too many (so the served answer is right, and a group has a signal)."""
    first_calls = itertools.count()

    def script(messages: Sequence[Message]) -> str:
        if messages[-1].role == "tool":
            return f"The sum is {messages[-1].content}."
        a, b = map(int, re.findall(r"\d+", messages[-1].content)[:2])
        return f'<tool>{{"name": "add", "arguments": {{"a": {a}, "b": {b + next(first_calls) % 2}}}}}</tool>'

    return script


async def test_the_sums_app_feeds_its_run(tmp_path: Path) -> None:
    app = load_example()
    recorder = Recorder(tmp_path, group_fraction=1.0, group_size=2, reward=app.judge, seed=0)
    agent = SelfImprovingAgent(policy=ScriptedPolicy(half_right_model()), tools=[app.add], system_prompt=app.SYSTEM,
                               max_turns=3, recorder=recorder)
    summary = await app.serve(agent, app.requests_for(4, seed=0), quiet=True)
    assert summary.served == 4 and summary.mean == 1.0 and recorder.pending == 0
    with SQLiteStore.in_run(tmp_path) as store:
        groups = store.fetch_groups()
    assert len(groups) == 4 and all(len(g.rollouts) == 2 for g in groups)
    items, _ = items_from(groups, UpdateConfig(run_dir=tmp_path))
    assert sorted(r.reward for g in groups for r in g.rollouts) == [0.0] * 4 + [1.0] * 4
    assert len(items) == 8  # each group, a right and a wrong answer, carries a learning signal


def test_the_verdict_wants_the_sum_itself() -> None:
    app = load_example()
    request = app.request_for(38, 47)
    assert app.add(38, 47) == 85 and app.judge(request, "It is 85.") == 1.0
    assert app.judge(request, "It is 851.") == 0.0 and app.judge(request, "38 + 47") == 0.0
    assert app.requests_for(3, seed=5) == app.requests_for(3, seed=5) != app.requests_for(3, seed=6)


def test_a_server_that_is_gone_is_one_line_and_exit_code_4(capsys: pytest.CaptureFixture[str]) -> None:
    app = load_example()
    assert app.main(["http://127.0.0.1:9/v1", "--no-record", "--requests", "1", "--deadline-s", "1"]) == 4
    err = capsys.readouterr().err.strip().splitlines()  # the retries' warnings, then the one error line
    assert err[-1].startswith("sums_helper: ") and "Traceback" not in "".join(err)
