"""What a run spent: trainer updates, groups, tokens generated and minutes, read from its metrics.

    spent(run_dir) -> {"updates": 40, "groups_collected": 352, "groups_trained": 320,
                       "tokens_generated": 81234, "minutes": 17.9, "truncation_by_step_kind": {...}}

The variants are compared at equal trainer updates (exit-spec.md section 6: only the prompts differ,
so the paper's comparison is compute-equivalent by construction); this is how a report shows that
they were, and what each one cost besides (full ExIt's longer prompts and embedding model take
more minutes per update; the ``chains`` control's chains, generated but never trained on, are in
its groups' ``completion_tokens``). ``truncation_by_step_kind`` is the share of responses cut at their token
limit, per step kind (base, improve, diverge, ...): an iterate format that does not fit its
``max_tokens`` shows up here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from exitagent.log import read_metrics
from exitagent.run_dir import RunDir

BUDGET_KEYS = ("updates", "groups_collected", "groups_trained", "tokens_generated", "minutes")


def trained_seconds(run_dir: Path) -> float:
    """Seconds of collect + update so far (``exitagent.run`` keeps the clock across resumes)."""
    path = RunDir(run_dir).train_clock
    return float(json.loads(path.read_text())["seconds"]) if path.exists() else 0.0


def truncation_by_step_kind(group_rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per step kind: truncated responses / responses, over the collect metrics' group rows."""
    cut: dict[str, list[int]] = {}
    for row in group_rows:
        counts = cut.setdefault(str(row.get("step_kind", "?")), [0, 0])
        counts[0] += int(row.get("truncated", 0))
        counts[1] += int(row.get("rollouts", row.get("rewards_scored", 0)))
    return {kind: round(t / n, 4) for kind, (t, n) in sorted(cut.items()) if n}


def spent(run_dir: Path) -> dict[str, Any]:
    groups = read_metrics(run_dir, "collect", "group")
    trainer = read_metrics(run_dir, "update")
    return {
        "updates": sum(row.get("kind") == "update" for row in trainer),
        "groups_collected": len(groups),
        # a batch with no signal is consumed too: it is part of the budget though no update came of it
        "groups_trained": int(sum(row.get("groups", 0) for row in trainer
                                  if row.get("kind") in ("update", "no_signal"))),
        "tokens_generated": int(sum(row.get("completion_tokens", 0) for row in groups)),
        "minutes": round(trained_seconds(run_dir) / 60, 2),
        "truncation_by_step_kind": truncation_by_step_kind(groups),
    }


def describe(budget: dict[str, Any]) -> str:
    cut = ", ".join(f"{kind} {100 * rate:.0f}%" for kind, rate in budget["truncation_by_step_kind"].items())
    return (f"{budget['updates']} updates, {budget['groups_trained']} groups trained "
            f"({budget['groups_collected']} collected), {budget['tokens_generated']} tokens generated, "
            f"{budget['minutes']:.1f} training minutes; truncated: {cut or 'none'}")
