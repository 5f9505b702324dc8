"""Token limits per step kind: a divergence step's format (summary, new approach, new answer) gets
room of its own, and collect's CLI takes the limits with one clear error for bad ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from exitagent import collect
from exitagent.collect import CollectConfig
from exitagent.errors import ConfigError
from exitagent.run import parse_config
from exitagent.types import StepKind


def test_each_step_kind_gets_its_own_limit(tmp_path: Path) -> None:
    cfg = CollectConfig(run_dir=tmp_path, max_tokens=64, diverge_max_tokens=192, improve_max_tokens=96)
    limits = {kind: cfg.sampling(kind).max_tokens for kind in StepKind}
    assert limits == {StepKind.BASE: 64, StepKind.REPLAY: 64, StepKind.IMPROVE: 96, StepKind.DEBUG: 96,
                      StepKind.DIVERGE: 192}
    plain = CollectConfig(run_dir=tmp_path, max_tokens=64)  # 0: every kind as --max-tokens
    assert {plain.sampling(kind).max_tokens for kind in StepKind} == {64}
    assert cfg.sampling(StepKind.DIVERGE).temperature == cfg.temperature
    with pytest.raises(ConfigError, match="per-step max-tokens"):
        CollectConfig(run_dir=tmp_path, diverge_max_tokens=-1)


def test_run_gives_divergence_steps_room_and_the_cli_refuses_nonsense(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_config([]).diverge_max_tokens > parse_config([]).max_tokens
    assert collect.main(["--run-dir", str(tmp_path), "--diverge-max-tokens", "-5"]) == 2
    assert "per-step max-tokens" in capsys.readouterr().err
