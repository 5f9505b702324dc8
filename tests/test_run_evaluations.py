"""exitagent.run on resume: a saved evaluation is reused only when it measured the policy now
served with the same flags; a base evaluation that no longer fits is an error, not a silent
re-measurement of the trained weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exitagent import run
from exitagent.errors import ExitAgentError


def saved(cfg: run.RunConfig, name: str, policy: str) -> Path:
    path = cfg.run_dir / "eval" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"accuracy_by_step": [0.5, 0.5], "measured": run.evaluation_key(cfg, policy)}))
    return path


def test_an_evaluation_of_the_served_policy_with_the_same_flags_is_reused(tmp_path: Path) -> None:
    cfg = run.parse_config(["--run-dir", str(tmp_path)])
    saved(cfg, "base", run.BASE_POLICY)
    saved(cfg, "trained", "step-000007")
    assert run.saved_evaluation(cfg, "base", run.BASE_POLICY) is not None
    assert run.saved_evaluation(cfg, "trained", "step-000007") is not None


def test_a_trained_evaluation_of_older_weights_is_measured_again(tmp_path: Path) -> None:
    cfg = run.parse_config(["--run-dir", str(tmp_path)])
    saved(cfg, "trained", "step-000007")
    assert run.saved_evaluation(cfg, "trained", "step-000012") is None
    assert run.saved_evaluation(run.parse_config(["--run-dir", str(tmp_path), "--eval-steps", "2"]), "trained",
                                "step-000007") is None  # other flags: measured again too
    assert run.saved_evaluation(cfg, "base", run.BASE_POLICY) is None  # never measured


def test_a_base_evaluation_with_other_flags_before_training_is_measured_again(tmp_path: Path) -> None:
    saved(run.parse_config(["--run-dir", str(tmp_path)]), "base", run.BASE_POLICY)
    other = run.parse_config(["--run-dir", str(tmp_path), "--max-tokens", "32"])
    assert run.saved_evaluation(other, "base", run.BASE_POLICY) is None


def test_a_base_evaluation_with_other_flags_after_training_is_a_clear_error_and_kept(tmp_path: Path) -> None:
    cfg = run.parse_config(["--run-dir", str(tmp_path)])
    path = saved(cfg, "base", run.BASE_POLICY)
    before = path.read_text()
    other = run.parse_config(["--run-dir", str(tmp_path), "--eval-tasks", "50"])
    with pytest.raises(ExitAgentError, match="new --run-dir"):
        run.saved_evaluation(other, "base", "step-000012")
    assert path.read_text() == before


def test_the_training_clock_survives_a_restart(tmp_path: Path) -> None:
    assert run.trained_seconds(tmp_path) == 0.0
    run._record_training(tmp_path, 61.25)
    assert run.trained_seconds(tmp_path) == pytest.approx(61.2, abs=0.06)
    assert [p.name for p in tmp_path.iterdir()] == [run.TRAIN_CLOCK]
