"""``--config FILE.toml`` (exitagent/config.py): defaults < file < flags, and one clear error for a
bad file, through the real parsers of the entry points."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from exitagent import config
from exitagent.collect import CollectConfig
from exitagent.serve import ServeConfig
from training.config import UpdateConfig


def _update(tmp_path: Path, text: str, *flags: str) -> UpdateConfig:
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    parser = argparse.ArgumentParser(prog="python -m training.update")
    config.add_arguments(parser, UpdateConfig)
    return config.from_args(UpdateConfig, config.parse_args(parser, ["--config", str(path), *flags], "update"))


def _error(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str], section: str = "serve",
           config_type: type = ServeConfig) -> str:
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    parser = argparse.ArgumentParser(prog=f"python -m {section}")
    config.add_arguments(parser, config_type)
    with pytest.raises(SystemExit) as raised:
        config.parse_args(parser, ["--config", str(path)], section)
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "usage:" not in err  # one line about the file, not the flags
    return err


def test_file_sets_defaults_and_flags_win(tmp_path: Path) -> None:
    text = 'seed = 3\ntemperature = 0.7\n[update]\nrun-dir = "runs/r"\nlr = 5e-7\nbeta = 0\nquiet = true\nseed = 4\n'
    cfg = _update(tmp_path, text, "--lr", "2e-6")
    assert cfg.run_dir == Path("runs/r")  # a required flag given by the file; "-" spelling works
    assert cfg.lr == 2e-6  # the flag wins over the file
    assert cfg.beta == 0.0 and isinstance(cfg.beta, float)  # an integer where a number goes
    assert cfg.quiet is True and cfg.temperature == 0.7  # shared top-level key
    assert cfg.seed == 4  # the command's own section wins over the shared key
    assert cfg.groups_per_step == UpdateConfig(run_dir=Path("x")).groups_per_step  # untouched: the default


def test_a_shared_key_of_another_command_is_accepted_and_ignored(tmp_path: Path) -> None:
    # group_size is collect's, not update's; [serve] is for serve only
    cfg = _update(tmp_path, 'group_size = 4\nrun_dir = "r"\n[serve]\nport = 9\n[collect]\nnot_checked_here = 1\n')
    assert cfg.run_dir == Path("r")


@pytest.mark.parametrize(("text", "words"), [
    ("[serve]\nportt = 1\n", ["[serve]", "unknown key 'portt'", "--portt"]),
    ("portt = 1\n", ["(top level)", "unknown key 'portt'", "no command has"]),
    ("[srve]\nport = 1\n", ["unknown section [srve]"]),
    ("[serve]\nport = 1.5\n", ["[serve]: port must be an integer"]),
    ("[serve]\nport = true\n", ["port must be a single int"]),
    ('[serve]\ngpu_memory_utilization = "0.5"\n', ["gpu_memory_utilization must be a number"]),
    ("[serve]\nenforce_eager = 1\n", ["enforce_eager must be true or false"]),
    ('[serve]\ndtype = "fp8"\n', ["dtype must be one of auto, bfloat16, float32"]),
    ("[serve]\nmodel = 3\n", ["model must be a string"]),
    ("[serve]\nport = [1]\n", ["port must be a single"]),
    ("[serve.extra]\nport = 1\n", ["'extra' is a table"]),
    ("[serve]\nport = 1\nport-x = 2\n", ["unknown key 'port_x'"]),
    ("[serve]\nmax_model_len = 1\nmax-model-len = 2\n", ["given twice"]),
    ("[serve\n", ["not valid TOML"]),
])
def test_bad_file_is_one_error_naming_file_section_and_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, words: list[str]) -> None:
    err = _error(tmp_path, text, capsys)
    assert str(tmp_path / "recipe.toml") in err
    for word in words:
        assert word in err


def test_missing_file_and_abbreviated_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="serve")
    config.add_arguments(parser, ServeConfig)
    with pytest.raises(SystemExit):
        config.parse_args(parser, ["--config", str(tmp_path / "nope.toml")], "serve")
    assert f"--config {tmp_path / 'nope.toml'}: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        config.parse_args(parser, ["--config", "/dev/zero"], "serve")
    assert "/dev/zero: not a regular file" in capsys.readouterr().err
    (tmp_path / "r.toml").write_text("port = 1\n")
    with pytest.raises(SystemExit):  # argparse would take --conf for --config; the file would be skipped
        config.parse_args(parser, ["--conf", str(tmp_path / "r.toml")], "serve")
    assert "spell --config out in full" in capsys.readouterr().err


def test_subcommand_flags_and_left_over_flags_keep_the_file(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text('seed = 2\n[competitions]\nonly = "iris-species"\ntime-limit-s = 5\n[variants]\nseeds = "3"\n')
    parser = argparse.ArgumentParser(prog="competitions")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("prepare").add_argument("--only", default="")
    commands.add_parser("calibrate").add_argument("--time-limit-s", type=float, default=120.0)
    args = config.parse_args(parser, ["--config", str(path), "calibrate"], "competitions")
    assert args.time_limit_s == 5.0
    assert config.parse_args(parser, ["--config", str(path), "prepare"], "competitions").only == "iris-species"
    # variants passes what it does not know to exitagent.run, --config included, so run reads [run]
    variants = argparse.ArgumentParser(prog="variants")
    variants.add_argument("--seeds", default="0,1")
    args, rest = config.parse_known_args(variants, ["--config", str(path), "--lr", "1e-5"], "variants")
    assert args.seeds == "3" and rest == ["--lr", "1e-5", "--config", str(path)]


def test_list_flags_take_a_toml_list(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text('[collect]\nbase_url = ["http://a/v1", "http://b/v1"]\n')
    parser = argparse.ArgumentParser(prog="collect")
    parser.add_argument("--base-url", action="append", default=None)
    assert config.parse_args(parser, ["--config", str(path)], "collect").base_url == ["http://a/v1", "http://b/v1"]


def test_every_shared_config_is_importable() -> None:
    """SHARED_BY names each command's config class by module path: a move must update it."""
    for section in config.SHARED_BY:
        assert config._shared_somewhere(f"no_such_key_{section}") is False
    assert config._shared_somewhere("group_size") and config._shared_somewhere("lr")
    assert {CollectConfig.__name__, UpdateConfig.__name__} <= {t.split(":")[1] for t in config.SHARED_BY.values()}


def test_entry_point_reports_a_bad_recipe_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text("[update]\nlr = \"fast\"\n")
    done = subprocess.run([sys.executable, "-m", "training.update", "--config", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"python -m training.update: error: {path} [update]: lr must be a number, not 'fast'"]
