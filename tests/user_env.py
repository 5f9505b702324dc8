"""A user's environment, written OUTSIDE the package: a temp module that ``--domain MODULE:ENV`` imports.

Two typed tools on a per-episode notebook (a dict), and a reward that reads the notebook: the
model must store a value under a key and then say it. ``write_module`` puts the source in a
directory; the caller puts that directory on ``sys.path`` (or ``PYTHONPATH`` for a subprocess).
"""

from __future__ import annotations

from pathlib import Path

MODULE = "user_notes_env"
SOURCE = '''
"""A notebook environment: store a value, read it back, say it."""
from exitagent import Environment, Task


def put(state: dict, key: str, value: str) -> str:
    """Store a value in the notebook.

    Args:
        key: where to store it
        value: what to store
    """
    state[key] = value
    return "stored"


def get(state: dict, key: str) -> dict:
    """Read a value from the notebook.

    Args:
        key: where it was stored
    """
    return {"key": key, "value": state.get(key)}


def reward(task: Task, response: str, state: dict) -> float:
    key, value = task.answer.split("=")
    return float(state.get(key) == value and value in response)


TASKS = [Task(f"note-{i}", "notes", f"Store {v!r} under {k!r}, read it back, then reply with it.", answer=f"{k}={v}")
         for i, (k, v) in enumerate([("color", "blue"), ("city", "Oslo"), ("pet", "cat"), ("tea", "green")])]
ENV = Environment(tasks=TASKS, reward=reward, tools=[put, get], state=lambda task: {}, max_turns=4,
                  name="notes", system_prompt="You keep notes for the user.", require_action=True)
NOT_A_DOMAIN = 42
'''


def write_module(directory: Path) -> str:
    """Write the module into ``directory``; returns its ``--domain`` name."""
    (directory / f"{MODULE}.py").write_text(SOURCE, encoding="utf-8")
    return f"{MODULE}:ENV"
