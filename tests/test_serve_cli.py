"""Bad input to ``exitagent.serve`` fails fast with one clear line and a non-zero exit."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from exitagent.errors import ExitCode


def run_serve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "exitagent.serve", *args], capture_output=True, text=True,
                          timeout=timeout)


def last_line(result: subprocess.CompletedProcess[str]) -> str:
    return result.stderr.strip().splitlines()[-1]


def test_unknown_model(tmp_path: Path) -> None:
    result = run_serve("--model", "gpt-17", "--port", "0")
    assert result.returncode == 2 and last_line(result).startswith("error: unknown model 'gpt-17'")


def test_missing_weights_dir(tmp_path: Path) -> None:
    result = run_serve("--weights-dir", str(tmp_path / "nope"), "--port", "0")
    assert result.returncode == 2 and "does not exist" in last_line(result)


def test_port_in_use() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = run_serve("--port", str(port))
    assert result.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in last_line(result)


@pytest.mark.vllm
def test_vllm_failing_to_start_shows_its_log_tail(tmp_path: Path) -> None:
    # A context longer than the model's 8192 positions: vLLM refuses it during start-up.
    result = run_serve("--max-model-len", "999999", "--port", "0", "--log-file", str(tmp_path / "vllm.log"),
                       timeout=600)
    assert result.returncode == ExitCode.UNAVAILABLE  # the server failed; its log tail says why (docs/exit-codes.md)
    assert "vLLM exited during start-up; last log lines:" in result.stderr
    assert "max_model_len" in result.stderr or "max-model-len" in result.stderr


def test_api_key_never_reaches_the_run_config(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    key_file = tmp_path / "key"
    key_file.write_text("s3cret-from-file\n")
    # An unknown model stops serve after it saved its config, before vLLM would start.
    from_file = run_serve("--model", "gpt-17", "--port", "0", "--weights-dir", str(tmp_path / "weights"),
                          "--api-key-file", str(key_file))
    assert from_file.returncode == 2 and "unknown model" in last_line(from_file)
    saved = (tmp_path / "config" / "serve.json").read_text()
    assert "s3cret" not in saved and str(key_file) in saved
    on_command_line = run_serve("--model", "gpt-17", "--port", "0", "--weights-dir", str(tmp_path / "weights"),
                                "--api-key", "s3cret-flag")
    warning = on_command_line.stderr
    assert "--api-key is visible to every user" in warning and "EXITAGENT_API_KEY" in warning
    assert "s3cret" not in (tmp_path / "config" / "serve.json").read_text()


def test_api_key_bad_input(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    for args, message in (
        (("--api-key-file", str(tmp_path / "missing")), "cannot read the API key file"),
        (("--api-key-file", str(empty)), "is empty"),
        (("--api-key", "two words"), "printable ASCII without spaces"),
        (("--api-key", "a", "--api-key-file", str(empty)), "given more than once (--api-key, --api-key-file)"),
    ):
        result = run_serve("--port", "0", *args)
        assert result.returncode == 2 and message in last_line(result), (args, result.stderr[-500:])


def test_api_key_from_the_environment_conflicts_with_the_flag() -> None:
    result = subprocess.run([sys.executable, "-m", "exitagent.serve", "--port", "0", "--api-key", "x"],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "EXITAGENT_API_KEY": "y"})
    assert result.returncode == 2 and "given more than once (--api-key, EXITAGENT_API_KEY)" in last_line(result)


def test_gateway_limits_must_be_positive() -> None:
    result = run_serve("--port", "0", "--max-body-mib", "0")
    assert result.returncode == 2 and "must be positive" in last_line(result)


def test_parallelism_and_parsers_reach_the_vllm_command_line(tmp_path: Path) -> None:
    from exitagent.serving import engine

    plain = engine._command(engine.EngineSpec(model_dir=tmp_path, served_name="policy", port=1))
    flags = {"--data-parallel-size", "--tensor-parallel-size", "--tool-call-parser", "--reasoning-parser"}
    assert not flags & set(plain)
    spec = engine.EngineSpec(model_dir=tmp_path, served_name="policy", port=1, data_parallel_size=4,
                             tensor_parallel_size=2, tool_call_parser="hermes", reasoning_parser="deepseek_r1")
    command = " ".join(engine._command(spec))
    for passed in ("--data-parallel-size 4", "--tensor-parallel-size 2",
                   "--enable-auto-tool-choice --tool-call-parser hermes", "--reasoning-parser deepseek_r1"):
        assert passed in command


def test_parallel_sizes_must_be_positive() -> None:
    result = run_serve("--data-parallel-size", "0")
    assert result.returncode == 2 and "must be at least 1" in result.stderr
