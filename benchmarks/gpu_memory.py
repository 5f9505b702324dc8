"""Peak memory of one trainer update on a randomly initialised 3B- or 7B-shaped model (config only, no download).

    python benchmarks/gpu_memory.py --shape qwen2.5-7b --option lora            # one process
    torchrun --nproc-per-node 4 benchmarks/gpu_memory.py --shape qwen2.5-7b --option fp32   # FSDP2, 4 ranks
    python benchmarks/gpu_memory.py --table --worlds 1,8                         # every combination: one table

One measurement does what an update does, on ``--tokens`` tokens: the policy's forward (bf16
autocast over fp32 master weights, or bf16 weights), the reference's forward without gradients,
log-probabilities through the head in chunks, a GRPO-shaped loss with a KL term, backward, gradient
clipping and one optimizer step. Options are those of ``training.memory_table`` (the computed table):
``fp32``, ``bf16-ref``, ``adam8`` and ``bf16-sr`` (torchao's AdamW8bit), ``lora`` (peft, rank 64).
Under ``torchrun`` with more than one process the model is sharded with FSDP2 (``fully_shard`` per
decoder layer, then the root: embeddings and head), bf16 all-gathers and fp32 gradient reduction.

Peak: ``torch.cuda.max_memory_allocated`` on a GPU; on a CPU, the growth of the process's peak RSS
over its RSS before the model was built (allocator slack included). Printed beside the computed
figure. An option whose library is missing, or a configuration that runs out of memory, is a row
that says so.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training import memory_table as memory

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True)
NEEDS = {"adam8": "torchao", "bf16-sr": "torchao", "lora": "peft"}


def model_config(shape: str) -> Any:
    import transformers

    return transformers.LlamaConfig(**TINY) if shape == "tiny" else memory.model_config(shape)


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _init(model: Any) -> None:
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)


def build(shape: str, option: memory.Option, device: Any, world: int, lora_rank: int, checkpointing: bool) -> Any:
    """The policy (sharded when ``world`` > 1), its reference and the trainable parameters."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if option.weights == 2 else torch.float32
    cfg = model_config(shape)
    cfg.use_cache = False

    def make(kind: torch.dtype) -> Any:
        with torch.device("meta" if world > 1 else device):
            return AutoModelForCausalLM.from_config(cfg, dtype=kind)

    policy = make(dtype)
    if checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reference = None if option.lora else make(torch.float32 if option.reference == 4 else torch.bfloat16)
    if option.lora:
        import peft

        policy = peft.get_peft_model(policy, peft.LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank,
                                                             target_modules="all-linear"))
    scored, scored_ref = Scored(policy), None if reference is None else Scored(reference)
    if world > 1:
        for module in (scored, scored_ref):
            if module is not None:
                _shard(module, device)
    else:
        _init(scored)
    if scored_ref is not None:
        scored_ref.requires_grad_(False)
        if world == 1:
            _init(scored_ref)
    trainable = [p for p in scored.parameters() if p.requires_grad]
    frozen_adapter = [p.detach().clone() for p in trainable] if option.lora else []  # the refreshed reference
    return scored, scored_ref, trainable, frozen_adapter


def _shard(module: Any, device: Any) -> None:
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in _layers(module):
        fully_shard(layer, mp_policy=mixed)
    fully_shard(module, mp_policy=mixed)  # the root unit: embeddings, final norm and head together
    module.to_empty(device=device)
    _init(module)


def _layers(module: Any) -> Any:
    lm = module.lm.get_base_model() if hasattr(module.lm, "get_base_model") else module.lm
    return lm.model.layers


def _scored_class() -> type:
    import torch
    from torch.utils.checkpoint import checkpoint

    def chunk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = torch.nn.functional.linear(hidden, weight).float()
        return logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0]

    class Scored(torch.nn.Module):
        """Log-probabilities of a sequence, the head read inside ``forward`` (FSDP's root unit)."""

        def __init__(self, lm: Any) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            lm = self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm
            hidden = lm.model(input_ids=tokens).last_hidden_state[0, :-1]
            targets, weight = tokens[0, 1:], lm.lm_head.weight
            return torch.cat([checkpoint(chunk_logprobs, hidden[lo:lo + memory.CHUNK], weight,
                                         targets[lo:lo + memory.CHUNK], use_reentrant=False)
                              for lo in range(0, len(targets), memory.CHUNK)])

    return Scored


def Scored(lm: Any) -> Any:
    return _scored_class()(lm)


def optimizer(option: memory.Option, params: list[Any]) -> Any:
    import torch

    if option.key in ("adam8", "bf16-sr"):
        from torchao.optim import AdamW8bit

        return AdamW8bit(params, lr=1e-6, weight_decay=0.0, bf16_stochastic_round=option.key == "bf16-sr")
    return torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0)  # as training/trainer.py builds it


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    try:
        return _measure(args, device, world)
    finally:
        if world > 1:
            # The model's FSDP units held the group and are gone with _measure's frame: a gloo group
            # destroyed while they live aborts the rank at exit (as training/sharded.py found)
            gc.collect()
            dist.destroy_process_group()


def _measure(args: argparse.Namespace, device: Any, world: int) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    option = memory.BY_KEY[args.option]
    import transformers  # noqa: F401  (imported before the baseline: library code is not the model's memory)

    if (need := NEEDS.get(args.option)) is not None:
        __import__(need)
    baseline, started = _rss_bytes(), time.monotonic()
    scored, scored_ref, trainable, _frozen = build(args.shape, option, device, world, args.lora_rank,
                                                    args.checkpointing)
    opt = optimizer(option, trainable)
    vocab = model_config(args.shape).vocab_size
    tokens = torch.randint(0, vocab, (1, args.tokens), device=device,
                           generator=torch.Generator(device).manual_seed(0))
    advantage = torch.randn(args.tokens - 1, device=device, generator=torch.Generator(device).manual_seed(1))
    autocast = option.weights == 4 and world == 1  # FSDP's mixed precision casts for itself
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        logp = scored(tokens)
        with torch.no_grad():
            ref = scored_ref(tokens) if scored_ref is not None else _adapter_off(scored, tokens)
    log_ratio = ref - logp
    loss = -(torch.exp(logp - logp.detach()) * advantage).mean() + 1e-3 * (log_ratio.exp() - log_ratio - 1).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    result = {"shape": args.shape, "option": args.option, "world": world, "tokens": args.tokens,
              "device": device.type, "checkpointing": args.checkpointing, "peak_gb": round(peak / memory.GB, 2),
              "seconds": round(time.monotonic() - started, 1)}
    if world > 1:
        peaks = [0.0] * world
        dist.all_gather_object(peaks, result["peak_gb"])
        result["peak_gb"] = max(peaks)
    return result


def _adapter_off(scored: Any, tokens: Any) -> Any:
    with scored.lm.disable_adapter():
        return scored(tokens)


def computed_gb(shape: str, option: str, world: int, tokens: int, checkpointing: bool) -> str:
    if shape == "tiny":
        return "-"
    return f"{memory.estimate(shape, option, world, tokens=tokens, checkpointing=checkpointing).gpu / memory.GB:.1f}"


def _missing(option: str) -> str | None:
    import importlib.util

    need = NEEDS.get(option)
    return need if need and importlib.util.find_spec(need) is None else None


def table(args: argparse.Namespace) -> int:
    """Every (shape, option, world) in a fresh process (torchrun for world > 1): one table."""
    rows = ["| model | option | ranks | tokens | computed GB | measured peak GB | seconds |",
            "|---|---|---:|---:|---:|---:|---:|"]
    script = str(Path(__file__).resolve())
    for shape in args.shapes.split(","):
        for option in args.options.split(","):
            for world in (int(w) for w in args.worlds.split(",")):
                flags = ["--shape", shape, "--option", option, "--tokens", str(args.tokens), "--device", args.device,
                         "--lora-rank", str(args.lora_rank),
                         "--checkpointing" if args.checkpointing else "--no-checkpointing"]
                launcher = [sys.executable, script] if world == 1 else [
                    sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", script]
                cells = _run_one(launcher + flags, option, args.timeout_s)
                rows.append(f"| {shape} | {option} | {world} | {args.tokens} | "
                            f"{computed_gb(shape, option, world, args.tokens, args.checkpointing)} | {cells} |")
                print(rows[-1], file=sys.stderr, flush=True)
    print("\n".join(rows))
    return 0


def _run_one(command: list[str], option: str, timeout_s: float) -> str:
    if (missing := _missing(option)) is not None:
        return f"skipped: {missing} not importable | -"
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout_s:g} s | -"
    found = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not found:
        # the last line that says something (torchrun ends its report with a rule of '=')
        said = [line.strip() for line in done.stderr.splitlines() if line.strip().strip("=-")]
        tail = next((line for line in reversed(said) if "rror" in line or "exitcode" in line), None) \
            or (said or ["no output"])[-1]
        return ("out of memory" if "out of memory" in done.stderr.lower() else f"failed: {tail[:80]}") + " | -"
    result = json.loads(found[0].removeprefix("RESULT "))
    return f"{result['peak_gb']:.1f} ({result['device']}) | {result['seconds']}"


def parser() -> argparse.ArgumentParser:
    shapes = [*memory.SHAPES, "tiny"]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=shapes, default="llama-3.2-3b")
    p.add_argument("--option", choices=list(memory.BY_KEY), default="fp32")
    p.add_argument("--tokens", type=int, default=memory.TOKENS, help="tokens in the micro-batch")
    p.add_argument("--lora-rank", type=int, default=memory.LORA_RANK)
    p.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="activation checkpointing")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--table", action="store_true", help="run every combination below, one process each")
    p.add_argument("--shapes", default="llama-3.2-3b,qwen2.5-7b")
    p.add_argument("--options", default=",".join(memory.BY_KEY))
    p.add_argument("--worlds", default="1", help="comma-separated process counts (FSDP when > 1)")
    p.add_argument("--timeout-s", type=float, default=900.0, help="per measurement")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.tokens < 2 or args.lora_rank < 1:
        print("error: --tokens must be at least 2 and --lora-rank at least 1", file=sys.stderr)
        return 2
    if args.table:
        return table(args)
    if (missing := _missing(args.option)) is not None:
        print(f"error: --option {args.option} needs {missing}, which is not importable here", file=sys.stderr)
        return 2
    result = measure(args)
    if int(os.environ.get("RANK", "0")) == 0:
        print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
