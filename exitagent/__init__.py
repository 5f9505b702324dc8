"""exitagent: train language-model agents to improve their own work at inference time (ExIt).

The embedding API is ``from exitagent import SelfImprovingAgent`` (see ``exitagent.agent``); your own
tasks, tools and reward are ``from exitagent import Environment, Task, Score`` (docs/environments.md).
They are imported on first use, so ``import exitagent`` stays light: entry points such as
``python -m exitagent.serve`` do not pay for the OpenAI client they never use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from exitagent.agent import Reply, SelfImprovingAgent
    from exitagent.domains.environment import Environment
    from exitagent.iterates import Improvement, Iterate
    from exitagent.recorder import Recorder
    from exitagent.types import Score, Task

__all__ = ["Environment", "Improvement", "Iterate", "Recorder", "Reply", "Score", "SelfImprovingAgent", "Task"]

_LAZY = {"Improvement": "exitagent.iterates", "Iterate": "exitagent.iterates", "SelfImprovingAgent": "exitagent.agent",
         "Reply": "exitagent.agent", "Recorder": "exitagent.recorder",
         "Environment": "exitagent.domains.environment", "Score": "exitagent.types", "Task": "exitagent.types"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this hook
        return value
    raise AttributeError(f"module 'exitagent' has no attribute {name!r}")
