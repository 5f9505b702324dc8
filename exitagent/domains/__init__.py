"""Task domains by name: what ``--domain`` picks in collect and evaluate (``base.Domain``)."""

from __future__ import annotations

from exitagent.domains.base import Domain, DomainSettings, RolledGroup, TaskSpec
from exitagent.domains.math import MathDomain
from exitagent.domains.mle import MLEDomain
from exitagent.domains.tool_use import ToolUseDomain
from exitagent.errors import ConfigError

DOMAINS: dict[str, Domain] = {"math": MathDomain(), "mle": MLEDomain(), "tool_use": ToolUseDomain()}


def get_domain(name: str) -> Domain:
    """The domain called ``name``; ``ConfigError`` naming the ones there are otherwise."""
    try:
        return DOMAINS[name]
    except KeyError:
        raise ConfigError(f"unknown domain {name!r}: choose from {', '.join(sorted(DOMAINS))}") from None


__all__ = ["DOMAINS", "Domain", "DomainSettings", "RolledGroup", "TaskSpec", "get_domain"]
