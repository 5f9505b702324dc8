"""Task domains by name: what ``--domain`` picks in collect and evaluate (``base.Domain``).

``--domain`` takes a built-in name (math, mle, tool_use), a name registered by an installed
package under the ``exitagent.domains`` entry-point group, or ``package.module:NAME`` where NAME is
an ``Environment`` (``domains.environment``, the public way to bring your own) or any object with
the ``Domain`` methods. Anything else is one ``ConfigError`` saying what was found.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any

from exitagent.domains.base import Domain, DomainSettings, TaskSpec
from exitagent.domains.environment import Environment
from exitagent.domains.math import MathDomain
from exitagent.domains.mle import MLEDomain
from exitagent.domains.tool_use import ToolUseDomain
from exitagent.errors import ConfigError

DOMAINS: dict[str, Domain] = {"math": MathDomain(), "mle": MLEDomain(), "tool_use": ToolUseDomain()}
ENTRY_POINTS = "exitagent.domains"
_METHODS = ("load_tasks", "open_evaluator", "roll_out", "evaluate_task")
_loaded: dict[str, Domain] = {}  # one instance per name for the process (tool use keeps snapshots on it)


def get_domain(name: str) -> Domain:
    """The domain ``name`` names; ``ConfigError`` naming the ones there are, or what was found instead."""
    if name in DOMAINS:
        return DOMAINS[name]
    if name not in _loaded:
        _loaded[name] = _as_domain(name, _import(name) if ":" in name else _entry_point(name))
    return _loaded[name]


def curriculum_preset(domain: Domain) -> str:
    """The paper's buffer preset a domain uses (``CurriculumConfig.for_domain``): its own name for
    the built-in ones, ``Environment.curriculum`` for the others."""
    return str(getattr(domain, "curriculum", domain.name))


def default_source(domain: Domain) -> str:
    """What ``--source`` means when it is not given: the domain's ``default_source`` (math
    ``arithmetic``, tool use ``bfcl``, MLE ``offline``); "" for one without (an ``Environment``'s
    tasks have one source)."""
    return str(getattr(domain, "default_source", ""))


def _import(spec: str) -> Any:
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # the user's module: say which and why, not a traceback
        raise ConfigError(f"--domain {spec}: cannot import {module_name!r}: {type(error).__name__}: {error}") \
            from None
    if not attribute or not hasattr(module, attribute):
        raise ConfigError(f"--domain {spec}: module {module_name!r} has no attribute {attribute!r}")
    return getattr(module, attribute)


def _entry_point(name: str) -> Any:
    found = [ep for ep in importlib.metadata.entry_points(group=ENTRY_POINTS) if ep.name == name]
    if not found:
        known = sorted({*DOMAINS, *(ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINTS))})
        raise ConfigError(f"unknown domain {name!r}: choose from {', '.join(known)}, "
                          "or name your own as package.module:NAME")
    try:
        return found[0].load()
    except Exception as error:
        raise ConfigError(f"domain {name!r} (entry point {found[0].value}) does not load: "
                          f"{type(error).__name__}: {error}") from None


def _as_domain(name: str, found: Any) -> Domain:
    if isinstance(found, Environment):
        return found
    missing = [m for m in _METHODS if not callable(getattr(found, m, None))]
    if missing or not isinstance(getattr(found, "name", None), str):
        what = f"class {found.__name__}" if isinstance(found, type) else f"{type(found).__name__} {found!r:.60}"
        raise ConfigError(f"--domain {name}: found {what}, not an Environment or a Domain "
                          f"(it lacks {', '.join(missing) or 'a name'})")
    return found


__all__ = ["DOMAINS", "Domain", "DomainSettings", "Environment", "TaskSpec", "curriculum_preset",
           "default_source", "get_domain"]
