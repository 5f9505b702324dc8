"""The variants command end to end at a tiny budget: real runs (serve, evaluate, collect, update).

Two of the five variants, the ends of the ladder (GRPO and full ExIt), to keep CI's time: what
differs between variants is one flag to ``exitagent.run`` (tests/test_variants_table.py checks
that every variant gets the same flags otherwise), and all five run with the command's default."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_variants_command_writes_a_table(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "exitagent.variants", "--out-dir", str(tmp_path), "--seeds", "0",
               "--variants", "grpo,exit",
               "--train-minutes", "0.5", "--eval-tasks", "3", "--eval-steps", "1", "--group-size", "2",
               "--groups-per-step", "2", "--max-tokens", "24", "--serve-flags=--enforce-eager"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    table = json.loads((tmp_path / "table.json").read_text())
    assert set(table["variants"]) == {"grpo", "exit"}
    for row in [table["base"], *table["variants"].values()]:
        assert row["seeds"] >= 1 and len(row["curve"]) == 2
        assert 0.0 <= row["accuracy_after_k"][0] <= 1.0 and -1.0 <= row["delta_k"][0] <= 1.0
        assert row["intervals"]["tasks"] == 3 and row["intervals"]["delta_k"] is not None  # the protocol's intervals
    assert "full ExIt" in (tmp_path / "table.md").read_text()
    # the base policy was evaluated once, by the first run; the other reused its sibling's copy
    assert result.stdout.count("[variants] reusing the base evaluation of") == 1, result.stdout[-3000:]
    assert result.stdout.count("evaluating the base policy") == 1, result.stdout[-3000:]
    assert (tmp_path / "curves.png").stat().st_size > 0
    for variant in table["variants"]:  # every run left its own report with curriculum plots
        assert (tmp_path / f"{variant}-s0" / "report" / "curriculum.png").exists()
