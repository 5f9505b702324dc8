"""Serve a policy over the OpenAI API and hot-reload every checkpoint the trainer publishes.

    python -m exitagent.serve --model smollm2-135m --host 127.0.0.1 --port 8000 --weights-dir RUN/weights

Three parts run in one task group: the vLLM engine (a child process group on a loopback port,
``exitagent.serving.engine``), the gateway that clients talk to (``exitagent.serving.gateway``: OpenAI routes only,
``x-exitagent-policy-version`` on every answer, ``GET /policy``), and the reload loop
(``exitagent.serving.reload``) that watches ``--weights-dir`` for ``step-N`` directories marked READY.
If the engine dies, it is restarted on the last good weights. SIGINT or SIGTERM stops all of it:
no vLLM process outlives serve.

Once the gateway answers, serve prints its base URL (``http://HOST:PORT/v1``) on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import structlog

from exitagent import config, models, precision
from exitagent import log as logging_setup
from exitagent.errors import ConfigError, ExitAgentError, ExitCode, fail, unwrap
from exitagent.serving import adapters, checkpoints, engine, gateway, served_form
from exitagent.serving.gateway import Gate, GatewayServer, create_app
from exitagent.serving.reload import Admin, CanaryCheck, Reloader, ServingState
from exitagent.types import PolicyVersion

log = structlog.get_logger(__name__)

LORA_RANKS = (0, 1, 8, 16, 32, 64, 128, 256, 320, 512)  # 0: no adapters; the rest: vLLM's --max-lora-rank


@dataclass(frozen=True)
class ServeConfig:
    model: str = field(default=models.DEFAULT_MODEL, metadata={"help": "model name, checkpoint dir or hub id"})
    host: str = field(default="127.0.0.1", metadata={"help": "address of the OpenAI-compatible gateway"})
    port: int = field(default=8000, metadata={"help": "port of the gateway"})
    weights_dir: Path | None = field(default=None, metadata={"help": "directory the trainer publishes into"})
    served_model_name: str = field(default="policy", metadata={"help": "model name clients ask for"})
    api_key: str | None = field(default=None, metadata={
        "help": f"require this bearer token on /v1 routes (visible in ps: prefer ${gateway.API_KEY_ENV})"})
    api_key_file: Path | None = field(default=None, metadata={"help": "read the bearer token from this file"})
    max_body_mib: float = field(default=8.0, metadata={"help": "largest request body the gateway accepts (MiB)"})
    head_timeout_s: float = field(default=10.0, metadata={"help": "time a client has to send a request head (s)"})
    body_timeout_s: float = field(default=60.0, metadata={"help": "time a client has to send a request body (s)"})
    upstream_timeout_s: float = field(default=600.0, metadata={
        "help": "longest the engine may stay silent during an answer before the client gets 504 (s)"})
    send_timeout_s: float = field(default=30.0, metadata={
        "help": "longest one streamed chunk may wait for a client that stopped reading (s)"})
    drain_timeout_s: float = field(default=300.0, metadata={
        "help": "longest a reload or restart waits for in-flight requests before cutting them off (s)"})
    max_model_len: int = field(default=2048, metadata={"help": "context length"})
    kv_cache_gib: int = field(default=4, metadata={"help": "KV cache size on the CPU (GiB)"})
    gpu_memory_utilization: float = field(default=0.85, metadata={"help": "fraction of GPU memory for vLLM"})
    enforce_eager: bool = field(default=False, metadata={"help": "no graph compilation (fast start, slower)"})
    dtype: str = field(default="auto", metadata={
        "choices": precision.CHOICES, "help": "auto: bf16 where the hardware runs it natively, else float32"})
    canary_tolerance: float | None = field(default=None, metadata={
        "help": "mean |dlogp| a reloaded checkpoint's canary may differ by (default: by serving dtype)"})
    canary_tokens: int = field(default=16, metadata={"help": "canary log-probabilities compared on each reload"})
    data_parallel_size: int = field(default=1, metadata={
        "help": "vLLM engines behind this server, one per GPU (docs/scaling.md: this or several serve processes)"})
    tensor_parallel_size: int = field(default=1, metadata={"help": "GPUs one engine's layers are split over"})
    tool_call_parser: str | None = field(default=None, metadata={
        "help": "vLLM tool-call parser (e.g. hermes, llama3_json); turns on --enable-auto-tool-choice"})
    reasoning_parser: str | None = field(default=None, metadata={"help": "vLLM reasoning parser (e.g. deepseek_r1)"})
    lora_rank: int = field(default=0, metadata={
        "help": "serve the trainer's LoRA adapters (training.update --lora-rank) of up to this rank on the base "
                "model, each loaded under a new name (1, 8, 16, 32, 64, ...; 0: full-weight checkpoints). Costs "
                "the adapter's extra matmuls per token; saves publishing and reloading the whole model"})
    engine_port: int = field(default=0, metadata={"help": "loopback port of the vLLM engine (0: any free)"})
    poll_s: float = field(default=1.0, metadata={"help": "how often to look for new checkpoints (s)"})
    startup_timeout_s: float = field(default=900.0, metadata={"help": "how long vLLM may take to start (s)"})
    log_file: Path | None = field(default=None, metadata={"help": "vLLM's log (default: under EXITAGENT_HOME)"})
    log_json: bool = field(default=False, metadata={"help": "log JSON lines instead of pretty text"})

    def __post_init__(self) -> None:
        precision.normalise(self.dtype)  # a typo fails before vLLM spends minutes starting
        if self.canary_tokens < 1 or (self.canary_tolerance is not None and not self.canary_tolerance > 0):
            raise ValueError("--canary-tokens and --canary-tolerance must be positive")
        if min(self.data_parallel_size, self.tensor_parallel_size) < 1:
            raise ValueError("--data-parallel-size and --tensor-parallel-size must be at least 1")
        if self.lora_rank not in LORA_RANKS:
            raise ValueError(f"--lora-rank must be one of {', '.join(map(str, LORA_RANKS))} (what vLLM accepts)")


def choose_precision(cfg: ServeConfig) -> tuple[precision.Precision, CanaryCheck]:
    """The serving dtype (logged with why) and the canary check that matches it."""
    device = "cpu" if engine.build() == "cpu" else "cuda"
    chosen = precision.choose(cfg.dtype, precision.detect(device))
    tolerance = cfg.canary_tolerance or precision.canary_tolerance(chosen.dtype)
    log.info("precision_chosen", dtype=chosen.dtype, reason=chosen.reason, capability=chosen.hardware.describe(),
             canary_tolerance=tolerance, canary_tokens=cfg.canary_tokens)
    return chosen, CanaryCheck(tolerance, cfg.canary_tokens)


async def serve(cfg: ServeConfig, *, ready: anyio.Event | None = None) -> None:
    """Run until cancelled (or a signal arrives)."""
    if cfg.weights_dir is not None and not cfg.weights_dir.is_dir():
        raise ExitAgentError(f"weights directory {cfg.weights_dir} does not exist (create it, or omit --weights-dir)")
    engine.check_port_free(cfg.host, cfg.port)
    api_key = gateway.resolve_api_key(cfg.api_key, cfg.api_key_file)  # bad input fails before vLLM starts
    limits = gateway.Limits(
        max_body_bytes=int(cfg.max_body_mib * 2**20), head_timeout_s=cfg.head_timeout_s,
        body_timeout_s=cfg.body_timeout_s, upstream_timeout_s=cfg.upstream_timeout_s, send_timeout_s=cfg.send_timeout_s,
    )
    if cfg.weights_dir is not None:  # RUN/weights: the run directory keeps the config of each process
        config.save(dataclasses.replace(cfg, api_key="***" if cfg.api_key else None), cfg.weights_dir.parent, "serve")
    model_dir = models.resolve(cfg.model)
    # a tied output head is served as a tensor of its own, or reloads would keep the base head
    base_dir = served_form.serving_copy(model_dir, models.home() / "served")
    chosen, canary_check = choose_precision(cfg)
    reference = checkpoints.tensor_shapes(base_dir)
    port = cfg.engine_port or engine.free_port()
    log_file = cfg.log_file or models.home() / "logs" / f"vllm-{cfg.port}.log"
    state = ServingState(version=PolicyVersion(0, "base"), directory=base_dir,
                         base=models.identity(cfg.model, model_dir))  # collectors refuse a mix of base models
    gate = Gate(drain_timeout_s=cfg.drain_timeout_s)

    def spec_for(directory: Path) -> engine.EngineSpec:
        return engine.EngineSpec(
            model_dir=base_dir if cfg.lora_rank else directory, served_name=cfg.served_model_name, port=port,
            max_model_len=cfg.max_model_len,
            kv_cache_gib=cfg.kv_cache_gib, gpu_memory_utilization=cfg.gpu_memory_utilization, log_file=log_file,
            enforce_eager=cfg.enforce_eager, dtype=chosen.dtype, data_parallel_size=cfg.data_parallel_size,
            tensor_parallel_size=cfg.tensor_parallel_size, tool_call_parser=cfg.tool_call_parser,
            reasoning_parser=cfg.reasoning_parser, lora_rank=cfg.lora_rank,
        )

    vllm = engine.Engine(spec_for(base_dir))
    admin = Admin(vllm.url, cfg.served_model_name)
    server_id = checkpoints.server_id(cfg.port)  # names this server's record in the weights directory
    verify = None
    if cfg.lora_rank:  # adapters on the base model, each under a versioned name (exitagent.serving.adapters)
        state.public_name = cfg.served_model_name
        admin = adapters.AdapterAdmin(vllm.url, cfg.served_model_name, state)
        verify = functools.partial(adapters.verify, base=reference, max_rank=cfg.lora_rank)
    try:
        await vllm.start(cfg.startup_timeout_s)
        app = create_app(vllm.url, state, gate, api_key=api_key, limits=limits)
        server = GatewayServer(app, cfg.host, cfg.port, limits)
        async with anyio.create_task_group() as tasks:

            async def run_gateway() -> None:
                await server.serve()
                tasks.cancel_scope.cancel()  # the gateway stopped (signal): stop everything else

            tasks.start_soon(_stop_on_signal, server)
            tasks.start_soon(run_gateway)
            while not server.started:  # noqa: ASYNC110 (the server exposes a flag, not an event)
                await anyio.sleep(0.05)
            print(f"http://{cfg.host}:{cfg.port}/v1", flush=True)
            log.info("serve_ready", base_url=f"http://{cfg.host}:{cfg.port}/v1", weights_dir=str(cfg.weights_dir))
            if ready is not None:
                ready.set()
            if cfg.weights_dir is not None:
                reloader = Reloader(admin, cfg.weights_dir, state, reference, gate.exclusive, canary_check, verify,
                                    server=server_id)
                reloader.record_served()
                tasks.start_soon(_watch, reloader, cfg.poll_s)
            tasks.start_soon(_supervise, vllm, admin, spec_for, state, gate, cfg.startup_timeout_s)
    finally:
        if cfg.weights_dir is not None:  # this server no longer holds a checkpoint back from pruning
            checkpoints.forget_served(cfg.weights_dir, server_id)
        with anyio.CancelScope(shield=True):
            await admin.aclose()
            await vllm.stop()


async def _stop_on_signal(server: GatewayServer) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("serve_stopping", signal=signal.Signals(signum).name)
            server.should_exit = True  # graceful: in-flight requests finish, then run_gateway cancels the rest
            return


async def _watch(reloader: Reloader, poll_s: float) -> None:
    while True:
        try:
            await reloader.poll()
        except Exception as error:  # e.g. the weights directory unreadable for a moment
            log.error("reload_poll_failed", error=f"{type(error).__name__}: {error}")
        await anyio.sleep(poll_s)


async def _supervise(vllm: engine.Engine, admin: Admin, spec_for: Callable[[Path], engine.EngineSpec],
                     state: ServingState, gate: Gate, timeout_s: float) -> None:
    """Restart a dead or broken engine on the last good weights, holding client requests meanwhile.

    A failed in-place reload can kill vLLM's engine core while its API process stays up and
    answers 503, so health counts as much as the process being alive.
    """
    failures = 0
    while True:
        await anyio.sleep(2.0)
        failures = 0 if vllm.running and await admin.healthy() else failures + 1
        if failures < 3:
            continue
        log.error("engine_died", restarting_on=str(state.directory), log_tail=vllm.log_tail(10))

        async def restart() -> None:  # retried with backoff; raises (ending serve) once it gives up
            await vllm.restart(spec_for(state.directory), timeout_s)
            await admin.after_restart(state.directory, str(state.version))

        await gate.exclusive(restart)
        failures = 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exitagent.serve", description=__doc__.split("\n\n")[0])
    config.add_arguments(parser, ServeConfig)
    try:
        cfg = config.from_args(ServeConfig, config.parse_args(parser, argv, "serve"))
    except ConfigError as bad:
        parser.error(str(bad))  # one usage line and exit 2, before anything starts
    logging_setup.configure(json_lines=cfg.log_json or None)
    try:
        anyio.run(serve, cfg)
    except KeyboardInterrupt:
        pass
    except BaseException as raised:  # re-raised below unless it is ours
        error = unwrap(raised)
        if not isinstance(error, ExitAgentError):
            raise
        return fail(error)
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
