"""Serving LoRA adapters: verify each published adapter, load it into vLLM under a versioned name, route to it.

With ``serve --lora-rank R`` the engine starts on the base model with ``--enable-lora`` and the
trainer publishes adapters (``training.lora``). Each one is loaded with ``POST /v1/load_lora_adapter``
under a new name, ``{served name}-step-NNNNNN``, never reloaded in place under an old name (vLLM
keeps the first weights it loaded for a name). The canary is then run against the new name, as for
full weights, and only if it matches does the gateway send the policy's public model name to it
(``route_body``). The previous adapter stays loaded until the next one is verified, so a failed
load puts it back at once; older ones are unloaded.

Before vLLM sees an adapter, ``verify`` checks it against the served base: every LoRA tensor must
belong to a linear layer the base has, with the base's input and output sizes, and a rank the
engine was started for. An adapter trained for another model fails here with one clear error.
Standard library only, like ``exitagent.serving.checkpoints``.
"""

from __future__ import annotations

import json
from pathlib import Path

import structlog

from exitagent.errors import CheckpointError
from exitagent.serving import checkpoints
from exitagent.serving.checkpoints import Canary
from exitagent.serving.reload import Admin, ServingState

log = structlog.get_logger(__name__)

FORMAT = "lora"  # manifest.json "format" of a published adapter
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG, WEIGHTS)
_PREFIX = "base_model.model."

def is_adapter(directory: Path) -> bool:
    return (directory / CONFIG).is_file()

def verify(candidate: Path, base: dict[str, tuple[str, tuple[int, ...]]], max_rank: int) -> Canary:
    """Everything the server checks before vLLM may load an adapter. Returns its canary."""
    if not (candidate / checkpoints.READY).is_file():
        raise CheckpointError(f"{candidate}: no {checkpoints.READY} marker (still being written?)")
    try:
        checkpoints.check_contained(candidate)
    except (OSError, RuntimeError) as error:
        raise CheckpointError(f"{candidate}: cannot resolve its files: {error}") from error
    manifest = checkpoints.verify_manifest(candidate, complete=True)
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{candidate}: not a LoRA adapter (manifest format {manifest.get('format')!r}); "
                              f"this server serves adapters (--lora-rank)")
    rank = _check_config(candidate, max_rank)
    _check_tensors(candidate, base, rank)
    return Canary.read(candidate)

def _check_config(candidate: Path, max_rank: int) -> int:
    try:
        config = json.loads((candidate / CONFIG).read_text())
    except (OSError, ValueError, RecursionError) as error:
        raise CheckpointError(f"{candidate}: unreadable {CONFIG}: {error}") from error
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise CheckpointError(f"{candidate}: {CONFIG} is not a peft LoRA config (peft_type must be 'LORA')")
    rank = config.get("r")
    if type(rank) is not int or not 1 <= rank <= max_rank:
        raise CheckpointError(f"{candidate}: adapter rank {rank!r} is not an integer in 1..{max_rank} "
                              f"(serve --lora-rank)")
    if config.get("use_dora") or config.get("modules_to_save"):
        raise CheckpointError(f"{candidate}: DoRA and modules_to_save are not served (plain LoRA only)")
    return rank

def _check_tensors(candidate: Path, base: dict[str, tuple[str, tuple[int, ...]]], rank: int) -> None:
    """Each ``base_model.model.M.lora_{A,B}.weight`` must fit the base's ``M.weight`` of shape [out, in]."""
    tensors = checkpoints.safetensors_header(candidate / WEIGHTS)
    if not tensors:
        raise CheckpointError(f"{candidate}: {WEIGHTS} holds no tensors")
    for name, info in tensors.items():
        module, _, part = name.removeprefix(_PREFIX).rpartition(".lora_")
        if not name.startswith(_PREFIX) or part not in ("A.weight", "B.weight"):
            raise CheckpointError(f"{candidate}: {WEIGHTS} holds {name!r}, not a LoRA A or B matrix")
        if f"{module}.weight" not in base:
            raise CheckpointError(f"{candidate}: an adapter for another base model: the served model has no "
                                  f"layer {module!r}")
        out_features, in_features = base[f"{module}.weight"][1]
        expected = [rank, in_features] if part == "A.weight" else [out_features, rank]
        if info["shape"] != expected:
            raise CheckpointError(f"{candidate}: an adapter for another base model: {module} lora_{part[0]} has "
                                  f"shape {info['shape']}, the served model needs {expected} (its "
                                  f"{module}.weight is {[out_features, in_features]}, rank {rank})")

def route_body(body: bytes, state: ServingState) -> bytes:
    """The request body with the policy's public model name replaced by the adapter now served.

    Anything else (another model name, a body that is not a JSON object) passes unchanged and
    vLLM answers it as it would have.
    """
    if not state.adapter or not body:
        return body
    try:
        request = json.loads(body)
    except (ValueError, RecursionError):
        return body
    if not isinstance(request, dict) or request.get("model") != state.public_name:
        return body
    request["model"] = state.adapter
    return json.dumps(request).encode()

class AdapterAdmin(Admin):
    """Admin calls for a server of adapters: a load is ``/v1/load_lora_adapter`` under a new name."""

    def __init__(self, engine_url: str, served_name: str, state: ServingState, timeout_s: float = 120.0) -> None:
        super().__init__(engine_url, served_name, timeout_s)
        self.state = state
        self.loaded: list[str] = []  # names vLLM holds, oldest first

    @property
    def canary_model(self) -> str:
        return self.state.adapter or self.served_name

    async def load(self, directory: Path, version: str) -> None:
        """Serve the adapter in ``directory`` (or the bare base model, for a directory without one)."""
        if not is_adapter(directory):
            self.state.adapter = ""
        else:
            name = f"{self.served_name}-{version}"
            if name not in self.loaded:
                await self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(directory)})
                self.loaded.append(name)
            self.state.adapter = name
            log.info("adapter_loaded", name=name, path=str(directory))
        for old in self.loaded[:-2]:  # keep the one just loaded and the one before it (for a restore)
            if old != self.state.adapter:
                await self._unload(old)
        await self.set_version(version)

    async def after_restart(self, directory: Path, version: str) -> None:
        """A restarted engine holds no adapters: load the served one again."""
        self.loaded.clear()
        await self.load(directory, version)

    async def _unload(self, name: str) -> None:
        try:
            await self._post("/v1/unload_lora_adapter", {"lora_name": name})
        except Exception as error:  # a leftover adapter costs memory, not correctness
            log.warning("adapter_unload_failed", name=name, error=str(error)[:200])
        self.loaded.remove(name)

def engine_flags(max_rank: int) -> list[str]:
    """vLLM flags for a server of adapters (two resident: the served one and the one being verified)."""
    return ["--enable-lora", "--max-lora-rank", str(max_rank), "--max-loras", "2", "--max-cpu-loras", "2"]
