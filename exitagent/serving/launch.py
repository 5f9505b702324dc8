"""Start exitagent's processes from Python: used by the ``run`` orchestrator, benchmarks and tests.

Each process also runs on its own from the command line; this module only starts one as a child,
waits until it is ready, and stops it (and everything it spawned) again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from exitagent.errors import ServerError
from exitagent.run_dir import RunDir
from exitagent.serving import engine


@dataclass
class ServeProcess:
    """A running ``python -m exitagent.serve`` and the processes it had spawned when stopped."""

    process: subprocess.Popen[str]
    base_url: str
    weights_dir: Path
    log_path: Path
    descendants: list[Any] = field(default_factory=list)

    @property
    def root_url(self) -> str:
        return self.base_url.removesuffix("/v1")

    def policy(self, timeout_s: float = 10.0) -> dict[str, Any]:
        return dict(httpx.get(f"{self.root_url}/policy", timeout=timeout_s).json())

    def wait_for_version(self, name: str, timeout_s: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = self.policy()
            if info["version"] == name:
                return info
            time.sleep(0.05)
        raise ServerError(f"server did not reach {name} in {timeout_s} s: {self.policy()}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        if self.process.poll() is None:
            import psutil

            self.descendants = psutil.Process(self.process.pid).children(recursive=True)
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout_s)


def start_serve(run_dir: Path, *extra: str, port: int = 0, env: dict[str, str] | None = None,
                name: str = "serve") -> ServeProcess:
    """Start serve with ``run_dir/weights`` as its weights directory; return once it answers
    (serve gives vLLM ``--startup-timeout-s`` to start, then exits with its log tail). ``name``
    tells several servers' logs apart: RUN/logs/NAME.log and its vLLM's RUN/logs/NAME-vllm.log."""
    weights = RunDir(run_dir).weights
    weights.mkdir(parents=True, exist_ok=True)
    port = port or engine.free_port()
    log_path = RunDir(run_dir).log(name)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    vllm_log = RunDir(run_dir).logs / ("vllm.log" if name == "serve" else f"{name}-vllm.log")
    command = [sys.executable, "-m", "exitagent.serve", "--port", str(port), "--weights-dir", str(weights),
               "--log-file", str(vllm_log), "--log-json", *extra]
    # SIGTERM when the caller dies, kill -9 included: serve then stops its vLLM (which in turn would
    # get SIGTERM from the kernel if serve itself were killed). Call this from a long-lived thread.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log_path.open("a"), text=True,
                               env={**os.environ, **(env or {})}, preexec_fn=engine.die_with_parent(signal.SIGTERM))
    assert process.stdout is not None
    line = process.stdout.readline().strip()  # serve prints its base URL once ready, or exits
    if not line.startswith("http://"):
        process.kill()
        process.wait()
        raise ServerError(f"serve did not start (exit {process.returncode}):\n{log_path.read_text()[-3000:]}")
    return ServeProcess(process, line, weights, log_path)
