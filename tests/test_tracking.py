"""``--track wandb``: an experiment-tracking sink beside the JSONL metrics (exitagent/log.py), offline
here (real wandb, no network), set by flag or ``--config``, and one clear error without the extra."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

from exitagent import config
from exitagent.collect import CollectConfig
from exitagent.collect import main as collect_main
from exitagent.errors import ConfigError, ExitCode
from exitagent.log import MetricsFile, TrackFlags
from training.config import UpdateConfig


def test_offline_wandb_writes_its_run_files_beside_the_jsonl(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")  # nothing to look up outside the run directory
    run_dir = tmp_path / "my-run"
    flags = UpdateConfig(run_dir=run_dir, track="wandb", track_project="exitagent-test")
    metrics = MetricsFile(run_dir / "metrics" / "update.jsonl", tracker=flags.open_tracker(run_dir, "update"))
    metrics.write("update", step=1, loss=0.25, reward_mean=0.5, skipped=False)
    metrics.write("no_signal", step=1, groups=2.0, note="text is left out")
    metrics.close()
    rows = [json.loads(line) for line in (run_dir / "metrics" / "update.jsonl").read_text().splitlines()]
    assert [row["kind"] for row in rows] == ["update", "no_signal"]  # the JSONL record is unchanged
    [offline] = (run_dir / "tracking" / "wandb").glob("offline-run-*")
    [record] = offline.glob("run-*.wandb")  # what `wandb sync` uploads later
    data = record.read_bytes()
    for key in (b"update/loss", b"update/reward_mean", b"no_signal/groups", b"my-run-update", b"exitagent-test"):
        assert key in data, key
    assert b"no_signal/note" not in data


def test_an_unknown_tracker_or_mode_is_refused() -> None:
    with pytest.raises(ConfigError, match="--track must be one of none, wandb"):
        TrackFlags(track="mlflow").check_tracking()
    with pytest.raises(ConfigError, match="--track-mode one of offline, online"):
        TrackFlags(track="wandb", track_mode="sometimes").check_tracking()


def test_without_the_extra_it_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: `import wandb` raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'exitagent\[track\]'"):
        UpdateConfig(run_dir=tmp_path, track="wandb")
    assert collect_main(["--run-dir", str(tmp_path / "run"), "--track", "wandb", "--no-progress"]) == ExitCode.USAGE
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line == "collect: --track wandb needs the wandb package: pip install 'exitagent[track]'"
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_the_tracking_flags_come_from_a_config_file_too(tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    path = tmp_path / "r.toml"
    path.write_text('track = "wandb"\ntrack_project = "paper"\n[update]\ntrack_run = "seed-0"\n')
    for section, config_type in (("update", UpdateConfig), ("collect", CollectConfig)):
        parser = argparse.ArgumentParser(prog=section)
        config.add_arguments(parser, config_type)
        args = config.parse_args(parser, ["--config", str(path), "--run-dir", str(tmp_path)], section)
        built = config.from_args(config_type, args)
        assert (built.track, built.track_project) == ("wandb", "paper")
        assert built.track_run == ("seed-0" if section == "update" else "")
