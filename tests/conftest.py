"""Shared fixtures: the prepared default model and real ``exitagent.serve`` processes.

A served model takes one to two minutes to start on two CPU cores, so one server is shared by the
whole session (``served``); tests that change the served weights start their own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

from exitagent import engine, models


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return models.resolve(models.DEFAULT_MODEL)


@dataclass
class ServeProcess:
    """A running ``python -m exitagent.serve`` and what it spawned."""

    process: subprocess.Popen[str]
    base_url: str
    weights_dir: Path
    engine_port: int
    log_path: Path
    descendants: list[psutil.Process] = field(default_factory=list)

    @property
    def root_url(self) -> str:
        return self.base_url.removesuffix("/v1")

    def policy(self) -> dict:
        return httpx.get(f"{self.root_url}/policy", timeout=10).json()

    def wait_for_version(self, name: str, timeout_s: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = self.policy()
            if info["version"] == name:
                return info
            time.sleep(0.5)
        raise AssertionError(f"server did not reach {name} in {timeout_s} s: {self.policy()}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        if self.process.poll() is None:
            self.descendants = psutil.Process(self.process.pid).children(recursive=True)
        self.process.send_signal(sig)
        return self.process.wait(timeout=timeout_s)


def start_serve(tmp: Path, *extra: str, timeout_s: float = 600.0) -> ServeProcess:
    weights = tmp / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    port, engine_port = engine.free_port(), engine.free_port()
    log_path = tmp / "serve.log"
    command = [sys.executable, "-m", "exitagent.serve", "--port", str(port), "--engine-port", str(engine_port),
               "--weights-dir", str(weights), "--log-file", str(tmp / "vllm.log"), "--kv-cache-gib", "2",
               "--poll-s", "0.5", "--log-json", *extra]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log_path.open("w"), text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert process.stdout is not None
    deadline = time.monotonic() + timeout_s
    line = ""
    while time.monotonic() < deadline and not line:
        line = process.stdout.readline().strip()
        if process.poll() is not None:
            raise RuntimeError(f"serve exited ({process.returncode}):\n{log_path.read_text()[-3000:]}")
    if not line.startswith("http://"):
        process.kill()
        raise RuntimeError(f"serve did not print its URL:\n{log_path.read_text()[-3000:]}")
    return ServeProcess(process, line, weights, engine_port, log_path)


@pytest.fixture(scope="session")
def serve_factory():
    """``start_serve(tmp_dir, *extra_flags)``: start a serve process (the caller stops it)."""
    return start_serve


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory, model_dir: Path):
    """One real CPU vLLM server on the packaged model, shared by the session."""
    server = start_serve(tmp_path_factory.mktemp("served"))
    yield server
    if server.process.poll() is None:
        server.stop()
