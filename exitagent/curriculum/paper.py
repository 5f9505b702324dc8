"""The paper's hyperparameters, per domain and variant, as one table.

Source: the paper's Tables 4-6 as restated in exit-spec.md (section 5: batch sizes, epochs,
learning rates, reference refresh; section 6: N / B_min / p / p_div; section 7: the evaluation's
K). ``paper_values(domain, variant)`` is the only place these numbers live:
``CurriculumConfig.for_domain`` (and so collect), ``exitagent.run`` (its help, and the trainer's
epochs and overlong filter per domain) and ``exitagent.evaluate`` (its default K) read them from
here, and tests/test_paper_table.py checks them against the spec's lines.

``drop_unparseable`` is the paper's overlong filtering in tool use (issue 14: rollouts without a
valid action carry no gradient; ``training.update --drop-unparseable``); exit-spec.md does not
restate it, so its source is the issue's reading of the paper.

Values the paper leaves open are marked in ``NOT_FROM_PAPER`` (kappa: exit-spec.md section 2).
Where this project runs something else by default (the embedded arithmetic run: a smaller buffer
that fills within minutes), that is a named flag whose help states the paper's value.

Deliberately NOT taken from issue 14's text: it says "+ diverge" should use p_div 0.2 in tool use
and MLE, and lists per-variant MLE buffer sizes (N 3/24/32/24, B_min 3/8/8/3) and a tool-use
"+ curriculum" N of 320. The spec's tables say tool use 640 / 320 / 0.5 / 0.5 and MLE
24 / 3 / 0.5 / 0.5, with one per-variant exception (tool-use "+ curriculum": p = 0.2); the
spec wins until someone checks the paper's appendix and corrects both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from exitagent.errors import ConfigError
from exitagent.types import Variant


@dataclass(frozen=True)
class PaperValues:
    """One (domain, variant) row: curriculum (section 2/6) and trainer (section 5) values."""

    capacity: int  # N
    min_buffer: int  # B_min
    p_buffer: float  # p
    p_diverge: float  # p_div (used by "+ diverge" and full ExIt only)
    kappa: float  # softmax temperature over buffer scores: NOT from the paper
    group_size: int  # G
    groups_per_step: int  # prompts per update
    epochs: int  # passes over each batch
    drop_unparseable: bool  # overlong filtering: action-less responses out of the loss (module docstring)
    lr: float
    ref_alpha: float  # reference refresh factor every M updates
    eval_steps: int  # K of the inference-time evaluation (exitagent.evaluate's default --steps)

    def curriculum(self) -> dict[str, float | int]:
        """The fields ``CurriculumConfig`` takes."""
        return {"capacity": self.capacity, "min_buffer": self.min_buffer, "p_buffer": self.p_buffer,
                "p_diverge": self.p_diverge, "kappa": self.kappa, "group_size": self.group_size}


NOT_FROM_PAPER = frozenset({"kappa"})

_DOMAINS: Mapping[str, PaperValues] = {
    "math": PaperValues(capacity=512, min_buffer=128, p_buffer=0.5, p_diverge=0.2, kappa=10.0, group_size=8,
                        groups_per_step=128, epochs=1, drop_unparseable=False, lr=1e-6, ref_alpha=1.0,
                        eval_steps=16),
    "tool_use": PaperValues(capacity=640, min_buffer=320, p_buffer=0.5, p_diverge=0.5, kappa=10.0, group_size=8,
                            groups_per_step=16, epochs=2, drop_unparseable=True, lr=5e-7,
                            ref_alpha=1.0, eval_steps=4),
    "mle": PaperValues(capacity=24, min_buffer=3, p_buffer=0.5, p_diverge=0.5, kappa=10.0, group_size=8,
                       groups_per_step=4, epochs=1, drop_unparseable=False, lr=1e-6, ref_alpha=0.5,
                       eval_steps=16),
}
# Per-variant exceptions to a domain's row (exit-spec.md section 6: "curriculum-only p = 0.2").
_VARIANT_OVERRIDES: Mapping[tuple[str, Variant], Mapping[str, float]] = {
    ("tool_use", Variant.CURRICULUM): {"p_buffer": 0.2},
}

DOMAINS = tuple(_DOMAINS)


def paper_values(domain: str, variant: Variant = Variant.EXIT) -> PaperValues:
    """The paper's values for ``variant`` in ``domain`` ("math", "tool_use", "mle")."""
    if domain not in _DOMAINS:
        raise ConfigError(f"no paper values for domain {domain!r}: pick one of {sorted(_DOMAINS)}")
    return dataclasses.replace(_DOMAINS[domain], **_VARIANT_OVERRIDES.get((domain, variant), {}))  # type: ignore[arg-type]


def eval_steps(domain: str) -> int:
    """The paper's evaluation K for ``domain``; a domain of your own gets math's, the default protocol."""
    return _DOMAINS.get(domain, _DOMAINS["math"]).eval_steps
