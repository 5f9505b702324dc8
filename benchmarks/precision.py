"""bf16 against fp32 on this machine: serving tok/s, trainer tokens/s, and the canary gap of each.

    .venv/bin/python benchmarks/precision.py [--dtypes bfloat16,float32] [--rounds 2] [--train-steps 1]
        [--train-warmup 1] [--skip-serving] [--skip-training] [--enforce-eager]

Which dtype is fast depends on the CPU (``exitagent.precision``): on one without native bf16 a
bf16 step of the trainer was measured 18x slower than fp32. This prints, side by side:

- *trainer*: one forward+backward of the packaged 135M model on ``--batch`` x ``--seq`` random
  tokens (default 4 x 128), fp32 master weights, without autocast (fp32) and with bf16 autocast,
  as ``training.trainer`` runs; median of ``--train-steps`` after ``--train-warmup`` untimed ones.
- *serving*: a real vLLM server (``exitagent.serving.engine``) per dtype, started once (start-up time
  reported), the same ``--concurrency`` (8) chat requests of exactly ``--tokens`` (64) new tokens
  per round (``ignore_eos``), one untimed round, then ``--rounds`` timed ones.
- *canary gap*: the mean and max |difference| between the log-probabilities vLLM serves for the
  canary prompt and what the trainer computes for the same checkpoint (in fp32, as
  ``training.publish.compute_canary`` does, and with bf16 autocast), the figure the server's
  canary tolerance must clear (``precision.canary_tolerance``). The servers load an fp32
  checkpoint like the trainer publishes: the base model with small noise added, so its weights,
  like trained ones, are not exactly representable in bf16.

On an AVX2-only CPU the bf16 training step takes minutes: ``--train-steps 1 --train-warmup 0``
keeps the whole benchmark near ten minutes there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _machine

from exitagent import models
from exitagent.serving import engine
from exitagent.serving.reload import Admin

PROMPTS = [f"Write a short story about a robot who learns the number {i}." for i in range(8)]


def _time_steps(model: Any, ids: Any, autocast: bool, warmup: int, steps: int) -> float:
    """Median seconds of one forward+backward (next-token loss) after ``warmup`` untimed ones."""
    import torch

    times = []
    for i in range(warmup + steps):
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def prepare(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Write the fp32 checkpoint the servers load; time the trainer; compute the trainer's canaries."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.publish import compute_canary

    base = models.resolve(models.DEFAULT_MODEL)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base)
    with torch.no_grad():  # like a few updates at lr 2e-5: off the bf16 grid, the same model otherwise
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * args.noise)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    result: dict[str, Any] = {"canary": {"float32": compute_canary(model.eval(), tokenizer)}}
    result["canary"]["bfloat16"] = _bf16_canary(model, result["canary"]["float32"].token_ids)
    if not args.skip_training:
        model.train()
        ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq))
        for dtype in args.dtypes:
            seconds = _time_steps(model, ids, dtype == "bfloat16", args.train_warmup, args.train_steps)
            result.setdefault("train", {})[dtype] = seconds
            print(f"trainer {dtype}: {seconds:.2f} s per forward+backward", flush=True)
    return result


def _bf16_canary(model: Any, token_ids: tuple[int, ...]) -> tuple[float, ...]:
    """The canary's log-probabilities with the forward pass under bf16 autocast."""
    import torch

    ids = torch.tensor([token_ids])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids).logits.float()
    logprobs = torch.log_softmax(logits[0, :-1], dim=-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    return tuple(float(x) for x in logprobs)


async def _round(client: Any, url: str, tokens: int) -> tuple[int, float]:
    import anyio

    counts: list[int] = []

    async def one(prompt: str) -> None:
        body = {"model": "policy", "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
                "temperature": 0.0, "ignore_eos": True}
        response = await client.post(f"{url}/v1/chat/completions", json=body)
        response.raise_for_status()
        counts.append(int(response.json()["usage"]["completion_tokens"]))

    started = time.perf_counter()
    async with anyio.create_task_group() as group:
        for prompt in PROMPTS:
            group.start_soon(one, prompt)
    return sum(counts), time.perf_counter() - started


async def serve_one(args: argparse.Namespace, checkpoint: Path, dtype: str, canary: Any,
                    log_dir: Path) -> dict[str, Any]:
    import httpx

    spec = engine.EngineSpec(model_dir=checkpoint, served_name="policy", port=engine.free_port(), kv_cache_gib=2,
                             dtype=dtype, enforce_eager=args.enforce_eager, log_file=log_dir / f"vllm-{dtype}.log")
    vllm = engine.Engine(spec)
    started = time.perf_counter()
    await vllm.start()
    result: dict[str, Any] = {"startup_s": time.perf_counter() - started}
    admin = Admin(vllm.url, "policy")
    try:
        async with httpx.AsyncClient(timeout=1800) as client:
            await _round(client, vllm.url, args.tokens)  # warm-up: first requests compile and allocate
            total_tokens, total_s = 0, 0.0
            for _ in range(args.rounds):
                tokens, seconds = await _round(client, vllm.url, args.tokens)
                total_tokens, total_s = total_tokens + tokens, total_s + seconds
        result["tok_s"] = total_tokens / total_s
        served = await admin.prompt_logprobs(canary.token_ids)
        result["served_canary"] = served
    finally:
        await admin.aclose()
        await vllm.stop()
    print(f"serving {dtype}: start-up {result['startup_s']:.0f} s, {result['tok_s']:.1f} tok/s", flush=True)
    return result


def _gap(served: list[float], expected: tuple[float, ...]) -> str:
    diffs = [abs(a - b) for a, b in zip(served, expected, strict=True)]
    return f"{statistics.fmean(diffs):.2g} / {max(diffs):.2g}"


def report(args: argparse.Namespace, prepared: dict[str, Any], serving: dict[str, dict[str, Any]]) -> None:
    print(f"\n{_machine.describe()}")
    eager = ", --enforce-eager" if args.enforce_eager else ""
    print(f"trainer: forward+backward, {args.batch} x {args.seq} tokens, fp32 master weights; serving: vLLM, "
          f"{len(PROMPTS)} concurrent x {args.tokens} tokens, {args.rounds} timed rounds{eager}")
    print(f"{'dtype':<10}{'train s/step':>13}{'train tok/s':>12}{'serve tok/s':>12}{'start-up s':>11}"
          f"{'canary gap vs fp32 (mean / max)':>33}{'vs bf16 autocast':>20}")
    train, canary = prepared.get("train", {}), prepared["canary"]
    for dtype in args.dtypes:
        step = train.get(dtype)
        served = serving.get(dtype)
        cells = [f"{step:>13.2f}{args.batch * args.seq / step:>12.0f}" if step else f"{'-':>13}{'-':>12}"]
        if served:
            cells.append(f"{served['tok_s']:>12.1f}{served['startup_s']:>11.0f}"
                         f"{_gap(served['served_canary'], canary['float32'].logprobs):>33}"
                         f"{_gap(served['served_canary'], canary['bfloat16']):>20}")
        print(f"{dtype:<10}{''.join(cells)}")
    if set(args.dtypes) == {"bfloat16", "float32"}:
        ratios = []
        if len(train) == 2:
            ratios.append(f"trainer fp32/bf16 {train['bfloat16'] / train['float32']:.2f}x")
        if len(serving) == 2:
            ratios.append(f"serving fp32/bf16 {serving['float32']['tok_s'] / serving['bfloat16']['tok_s']:.2f}x")
        if ratios:
            print("speed ratios (above 1: fp32 faster): " + ", ".join(ratios))
    tokens = len(canary["float32"].logprobs)
    print(f"canary: {tokens} log-probabilities; checkpoint noise {args.noise} (fp32, off the bf16 grid)")
    print("load average (1, 5, 15 min) at the end: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default="bfloat16,float32", type=lambda s: s.split(","))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--train-steps", type=int, default=2, help="timed forward+backward steps per dtype")
    parser.add_argument("--train-warmup", type=int, default=1, help="untimed steps per dtype first")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds of concurrent requests per dtype")
    parser.add_argument("--noise", type=float, default=3e-4, help="std of the noise added to the checkpoint")
    parser.add_argument("--enforce-eager", action="store_true", help="serve without graph compilation")
    parser.add_argument("--skip-serving", action="store_true")
    parser.add_argument("--skip-training", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import anyio

    args = _parse(argv)
    _machine.print_machine()
    with tempfile.TemporaryDirectory(prefix="precision-bench-") as tmp:
        checkpoint = Path(tmp) / "checkpoint"
        prepared = prepare(args, checkpoint)
        serving = {}
        if not args.skip_serving:
            for dtype in args.dtypes:
                serving[dtype] = anyio.run(serve_one, args, checkpoint, dtype, prepared["canary"]["float32"], Path(tmp))
    report(args, prepared, serving)


if __name__ == "__main__":
    sys.exit(main())
