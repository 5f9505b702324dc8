"""examples/notes_assistant.py with a short budget: its requests are answered with the tool, its
verdicts recorded, and the groups it feeds the run are ones the trainer learns from."""

from __future__ import annotations

import importlib.util
import itertools
import sys
from collections.abc import Sequence
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
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "notes_assistant.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("notes_assistant", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def half_right_model(app: ModuleType):
    """Quotes the note it looked up; of the answers sampled together, the first looks up the right
    topic and the second a wrong one (so the app's served answer is right, and a group has a signal)."""
    first_calls = itertools.count()

    def script(messages: Sequence[Message]) -> str:
        if messages[-1].role == "tool":
            return f"Your note says: {messages[-1].content}"
        topic = next(t for t in app.NOTES if t in messages[-1].content)
        topic = topic if next(first_calls) % 2 == 0 else "taxes"
        return f'<tool>{{"name": "find_note", "arguments": {{"topic": "{topic}"}}}}</tool>'

    return script


async def test_the_notes_app_feeds_its_run(tmp_path: Path) -> None:
    app = load_example()
    recorder = Recorder(tmp_path, group_fraction=1.0, group_size=2, reward=app.judge, seed=0)
    agent = SelfImprovingAgent(policy=ScriptedPolicy(half_right_model(app)), tools=[app.find_note],
                               system_prompt=app.SYSTEM, max_turns=3, recorder=recorder)
    summary = await app.serve(agent, app.topics_for(4, seed=0))
    assert summary.served == 4 and summary.mean == 1.0 and recorder.pending == 0
    with SQLiteStore.in_run(tmp_path) as store:
        groups = store.fetch_groups()
    assert len(groups) == 4 and all(len(g.rollouts) == 2 for g in groups)
    items, _ = items_from(groups, UpdateConfig(run_dir=tmp_path))
    assert sorted(r.reward for g in groups for r in g.rollouts) == [0.0] * 4 + [1.0] * 4
    assert len(items) == 8  # each group, a right and a wrong answer, carries a learning signal


def test_find_note_names_the_topics_it_knows() -> None:
    app = load_example()
    assert app.find_note("Rent ") == app.NOTES["rent"]
    assert "topics:" in app.find_note("taxes")
    assert app.judge(app.request_for("wifi"), "It is tulip42.") == 1.0
