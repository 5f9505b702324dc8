"""The pieces ``torchrun`` needs: the process group, FSDP2 sharding, balanced micro-batches.

    torchrun --nproc-per-node N [--nnodes M --rdzv-backend c10d --rdzv-endpoint HOST:PORT] \\
        -m training.update --run-dir RUN ...

Nothing here runs without torchrun's environment (``WORLD_SIZE``): one plain process trains as
it always did (``training.trainer.Trainer``). Under torchrun, ``training.sharded.ShardedTrainer``
uses these helpers; the rules they keep:

- the model is sharded with torch's own ``fully_shard`` (FSDP2): one unit per decoder layer, and
  the root unit holds what is left, the embeddings, final norm and output head, so tied
  embeddings stay in one unit;
- the policy's log-probabilities are computed in ``Policy.token_logprobs``, registered as an FSDP
  forward method: the chunked head reads ``lm_head.weight`` while the root unit is gathered,
  never a sharded parameter outside a forward;
- every rank runs the same number of micro-batches (balanced by token cost, topped up with
  zero-loss dummies), so every rank issues the same collectives;
- the model is read from disk by rank 0 alone and broadcast into shards built on the meta
  device: never one full copy per rank in host memory.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from collections.abc import Callable
from typing import Any

import structlog
import torch
import torch.distributed as dist

from exitagent.errors import ConfigError, ExitAgentError, ModelError
from training.data import MicroBatch

log = structlog.get_logger(__name__)


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place among the trainer's processes (from torchrun's environment)."""

    rank: int
    size: int
    local_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> World | None:
    """The world torchrun describes, or None when this process was not started by torchrun."""
    if "WORLD_SIZE" not in os.environ:
        return None
    try:
        size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    except (KeyError, ValueError) as error:
        raise ConfigError(f"torchrun's environment is incomplete or malformed ({error})") from error
    return World(rank, size, local_size)


def check_layout(world: World, device: str, cpu_offload: bool = False) -> None:
    """Refuse layouts that cannot work, before any process group forms."""
    if cpu_offload and device != "cuda":
        raise ConfigError("--fsdp-cpu-offload moves GPU ranks' shards to host memory; this run is on the CPU, "
                          "where they are already: leave it off")
    if world.size % world.local_size:
        raise ConfigError(f"world size {world.size} is not a multiple of the {world.local_size} processes per node: "
                          f"every node must run the same --nproc-per-node")
    if device == "cuda":
        gpus = torch.cuda.device_count()
        if world.local_size > gpus:
            raise ConfigError(f"--nproc-per-node {world.local_size} is larger than this node's {gpus} GPU(s)")
        return
    cores = _cores()
    if world.local_size > cores:
        raise ConfigError(f"--nproc-per-node {world.local_size} is larger than the {cores} CPU core(s) this node "
                          f"gives the trainer: each rank needs a core of its own (use at most {cores})")


def start(world: World, device: str, timeout_s: float, cpu_offload: bool = False) -> torch.device:
    """Join the process group; a collective that waits longer than ``timeout_s`` raises, never hangs."""
    check_layout(world, device, cpu_offload)
    where = device_of(device)
    if device == "cuda":
        torch.cuda.set_device(where)
    else:
        # Each rank on its own cores: torch's default (all cores per process) oversubscribes them.
        torch.set_num_threads(max(1, _cores() // world.local_size))
    dist.init_process_group("nccl" if device == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_s))
    log.info("process_group_joined", rank=world.rank, world_size=world.size, device=str(where))
    return where


def device_of(device: str) -> torch.device:
    """This rank's device: its own GPU (``LOCAL_RANK``), or the CPU."""
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if device == "cuda" else torch.device("cpu")


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast(value: Any, world: World) -> Any:
    """Rank 0's ``value`` on every rank (pickled: for commands and batches, not for weights)."""
    box = [value if world.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def from_rank0(read: Callable[[], Any], world: World) -> Any:
    """``read()`` on rank 0 (which alone reads the run's and the model's files), its result on every
    rank; when it raises one of ours, every rank raises it (none waits for a broadcast that never comes)."""
    outcome: tuple[str | None, Any] = (None, None)
    if world.is_main:
        try:
            outcome = (None, read())
        except ExitAgentError as raised:
            outcome = (str(raised), None)
    message, value = broadcast(outcome, world)
    if message is not None:
        raise ModelError(message if world.is_main else f"rank 0: {message}")
    return value


# --- the sharded policy --------------------------------------------------------------------------


class Policy(torch.nn.Module):
    """A causal LM whose GRPO log-probabilities run inside an FSDP forward (see the module docstring)."""

    def __init__(self, lm: Any) -> None:
        super().__init__()
        self.lm = lm

    @property
    def config(self) -> Any:
        return self.lm.config

    def token_logprobs(self, tokens_BT: torch.Tensor, attention_BT: torch.Tensor, **kwargs: Any) -> Any:
        from training.loss import token_logprobs

        return token_logprobs(self.lm, tokens_BT, attention_BT, two_passes=True, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.lm(*args, **kwargs)


def shard(lm: Any, cpu_offload: bool) -> Policy:
    """Wrap ``lm`` in FSDP2 units (one per decoder layer, the rest in the root)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard, register_fsdp_forward_method

    policy = Policy(lm)
    options: dict[str, Any] = {"offload_policy": CPUOffloadPolicy()} if cpu_offload else {}
    layers = getattr(getattr(lm, "model", None), "layers", None)
    if layers is None:
        raise ConfigError(f"cannot shard {type(lm).__name__}: it has no .model.layers (a decoder-only LM)")
    for layer in layers:
        fully_shard(layer, **options)
    fully_shard(policy, **options)
    register_fsdp_forward_method(policy, "token_logprobs")
    return policy


def load(source: Any, world: World, device: torch.device, cpu_offload: bool, *, frozen: bool = False) -> Policy:
    """Read ``source`` on rank 0 only (into host memory), build every rank's copy on the meta device,
    shard it, then broadcast rank 0's weights into the shards. The other ranks never read ``source``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from transformers import AutoModelForCausalLM

    from training.trainer import _load

    full: dict[str, Any] = {}

    def read() -> tuple[Any, dict[str, torch.Tensor]]:
        lm = _load(source, torch.float32, torch.device("cpu"))
        full.update({f"lm.{k}": v for k, v in lm.state_dict().items()})
        # Non-persistent buffers (rotary frequencies) are in no state dict: they go with the config.
        return lm.config, dict(lm.named_buffers())

    config, buffers = from_rank0(read, world)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if getattr(lm.config, "tie_word_embeddings", False):
        lm.tie_weights()
    policy = shard(lm, cpu_offload)
    # Real (empty) shards before the broadcast fills them: loading into meta tensors would assign
    # new parameters, and untie the head from the embeddings.
    policy.to_empty(device="cpu" if cpu_offload else device)
    set_model_state_dict(policy, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    full.clear()
    for name, value in buffers.items():
        owner, _, attr = name.rpartition(".")
        module = lm.get_submodule(owner) if owner else lm
        module.register_buffer(attr, value.to(device), persistent=attr in module.state_dict())
    if frozen:
        policy.eval().requires_grad_(False)
    return policy


def full_state_dict(policy: Policy) -> dict[str, torch.Tensor]:
    """The whole model's weights on rank 0 (in CPU memory), keyed as a Hugging Face checkpoint; {} elsewhere."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("lm."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def clip_grad_norm(policy: Policy, max_norm: float) -> float:
    """Clip by the norm of the full gradient (all shards), the same on every rank."""
    from torch.distributed.tensor import DTensor

    params = [p for p in policy.parameters() if p.grad is not None]
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)


def all_sum(values: dict[str, float], keys: list[str]) -> dict[str, float]:
    """``values`` summed over the ranks (every rank passes the same ``keys``)."""
    tensor = torch.tensor([values.get(k, 0.0) for k in keys], dtype=torch.float64)
    dist.all_reduce(tensor)
    return dict(zip(keys, tensor.tolist(), strict=True))


# --- balanced micro-batches ----------------------------------------------------------------------


def cost(batch: MicroBatch) -> int:
    """Tokens the model runs for ``batch`` (its shared prompt once): what a rank's time follows."""
    rows, width = batch.tokens_BT.shape
    return batch.prefix_len + rows * (width - batch.prefix_len)


def dummy_batch(pad_id: int) -> MicroBatch:
    """Two tokens, one of them scored, so a forward and backward touch every parameter (FSDP
    reduce-scatters every gradient on every rank); the caller multiplies its loss by zero."""
    ones = torch.ones(1, 2)
    return MicroBatch(tokens_BT=torch.full((1, 2), pad_id, dtype=torch.long), attention_BT=ones.long(),
                      mask_BT=torch.tensor([[0.0, 1.0]]), behaviour_logprobs_BT=torch.zeros(1, 2),
                      advantages_B=torch.zeros(1), truncated_B=torch.zeros(1, dtype=torch.bool),
                      unparseable_B=torch.zeros(1, dtype=torch.bool), labels=("dummy",))


def balance(batches: list[MicroBatch], ranks: int) -> list[list[MicroBatch]]:
    """Split ``batches`` over ``ranks`` by token cost (largest first, to the least loaded rank).

    Ranks may get different counts; the caller tops each up to the longest with dummies."""
    loads = [0] * ranks
    shares: list[list[MicroBatch]] = [[] for _ in range(ranks)]
    for batch in sorted(batches, key=cost, reverse=True):
        rank = min(range(ranks), key=lambda r: (loads[r], len(shares[r])))
        shares[rank].append(batch)
        loads[rank] += cost(batch)
    return shares
