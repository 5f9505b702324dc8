"""Bad input to ``exitagent.serve`` fails fast with one clear line and a non-zero exit."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest


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
    assert result.returncode == 2
    assert "vLLM exited during start-up; last log lines:" in result.stderr
    assert "max_model_len" in result.stderr or "max-model-len" in result.stderr
