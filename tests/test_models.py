"""Model names resolve to checkpoint directories; bad names get one clear error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from exitagent import models
from exitagent.errors import ConfigError, ModelError
from exitagent.serving import checkpoints


def test_default_model_is_prepared_once_with_a_verified_manifest(model_dir: Path) -> None:
    assert models.resolve("default") == model_dir == models.resolve("SmolLM2-135M-Instruct")
    manifest = checkpoints.verify_manifest(model_dir)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest["files"])
    assert "im_start" in (model_dir / "chat_template.jinja").read_text()
    assert models.prepare() == model_dir  # already there: returns without converting again


def test_local_checkpoint_directory(model_dir: Path, tmp_path: Path) -> None:
    assert models.resolve(str(model_dir)) == model_dir.resolve()
    with pytest.raises(ModelError, match=r"no config\.json"):
        models.resolve(str(tmp_path))
    with pytest.raises(ModelError, match="does not exist"):
        models.resolve(str(tmp_path / "missing"))


def test_unknown_name_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown model 'gpt-17'"):
        models.resolve("gpt-17")


def test_hub_id_without_network_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="cannot fetch 'nobody/no-such-model'"):
        models.resolve("nobody/no-such-model")


def test_cli_reports_errors_in_one_line() -> None:
    result = subprocess.run([sys.executable, "-m", "exitagent.models", "path", "gpt-17"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: unknown model")


def test_the_base_identity_tells_weights_apart_not_names_or_paths(tmp_path: Path) -> None:
    from tests.test_checkpoints import write_safetensors

    first, second = tmp_path / "a", tmp_path / "b"
    for directory in (first, second):
        directory.mkdir()
        write_safetensors(directory / "model.safetensors", {"embed.weight": (8, 4), "head.weight": (4, 8)})
    one, same = models.identity(str(first), first), models.identity("org/model", second)
    assert one["name"] == "a" and same["name"] == "org/model"  # a path shows only its last part (public /policy)
    assert one["fingerprint"] == same["fingerprint"]  # same weights under another name and path
    data = bytearray((second / "model.safetensors").read_bytes())
    data[-1] = 1  # the last byte of the last tensor
    (second / "model.safetensors").write_bytes(bytes(data))
    assert models.identity("org/model", second)["fingerprint"] != one["fingerprint"]
