"""The TRL half of ``benchmarks/grpo_step.py``: TRL's GRPOTrainer on the same prompts, timed.

    .venv/bin/python benchmarks/_trl_side.py --prompts 8 --samples 8 --max-tokens 128 --steps 2 --warmup 1

``grpo_step.py`` runs this in a subprocess of its own (so its memory and threads are its alone) and
reads the JSON on the last line of stdout. Set-up is the runtime notes' peer: TRL's default
generation (transformers ``generate``, no vLLM), fp32 weights with bf16 autocast, beta 0,
gradient checkpointing (GRPOConfig's default, and our trainer's too).

One iteration = one optimizer step: the 8 x 8 completions are generated in one batch
(``generation_batch_size`` 64) and trained as 8 micro-batches of 8 (``gradient_accumulation_steps``
8, so ``steps_per_generation`` 8: one generation per optimizer step, as in our loop).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

# Offline: the model is a local directory; nothing may reach for the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: import the repo's packages


class _Reward:
    """Our math evaluator as a TRL reward function (TRL calls it synchronously with the batch)."""

    __name__ = "math_correct"  # TRL names its reward metrics after the function

    def __init__(self) -> None:
        from evaluators.math import MathEvaluator

        self.evaluator = MathEvaluator()

    def __call__(self, prompts: list[Any], completions: list[Any], task_index: list[int],
                 **_: Any) -> list[float | None]:
        import anyio

        async def score_all() -> list[float | None]:
            rewards: list[float | None] = [0.0] * len(completions)

            async def one(i: int) -> None:
                text = completions[i][-1]["content"] if isinstance(completions[i], list) else completions[i]
                rewards[i] = (await self.evaluator.score(_TASKS[task_index[i]], text)).total

            async with anyio.create_task_group() as group:
                for i in range(len(completions)):
                    group.start_soon(one, i)
            return rewards

        return anyio.run(score_all)


_TASKS: list[Any] = []


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from evaluators.worlds.math_tasks import math_tasks
    from exitagent import models

    iterations = args.warmup + args.steps
    _TASKS[:] = math_tasks("arithmetic", "train", n=args.prompts * iterations, seed=args.seed)
    # Conversational prompts: TRL applies the chat template, as vLLM's chat route does for us.
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": t.prompt}], "task_index": i}
                                 for i, t in enumerate(_TASKS)])
    out_dir = tempfile.mkdtemp(prefix="grpo-step-trl-")
    config = GRPOConfig(
        output_dir=out_dir, max_steps=iterations, learning_rate=args.lr, beta=0.0,
        per_device_train_batch_size=args.samples, gradient_accumulation_steps=args.prompts,
        num_generations=args.samples, max_completion_length=args.max_tokens, temperature=args.temperature,
        use_vllm=False, bf16=args.precision == "bfloat16", model_init_kwargs={"dtype": torch.float32},
        shuffle_dataset=False,  # the same prompts in the same order as the exitagent side
        report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, push_to_hub=False,
        use_cpu=not torch.cuda.is_available(), seed=args.seed, dataloader_num_workers=0,
    )
    started = time.perf_counter()
    trainer = GRPOTrainer(model=str(models.resolve(models.DEFAULT_MODEL)), reward_funcs=_Reward(),
                          args=config, train_dataset=dataset)
    setup_s = time.perf_counter() - started

    # Generation: TRL's own _generate (transformers generate plus decoding). Generation plus
    # scoring: _generate_and_score_completions, which also runs the reward and the advantages.
    gen_s: list[float] = []
    gen_score_s: list[float] = []
    tokens: list[int] = []

    def timed(name: str, into: list[float], count: bool = False) -> None:
        inner = getattr(trainer, name)

        def wrapper(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            result = inner(*a, **k)
            into.append(time.perf_counter() - t0)
            if count:  # (prompt_ids, completion_ids, ...): completion_ids is a list of token lists
                tokens.append(sum(len(c) for c in result[1]))
            return result

        setattr(trainer, name, wrapper)

    timed("_generate", gen_s, count=True)
    timed("_generate_and_score_completions", gen_score_s)

    step_ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_train_begin(self, *_: Any, **__: Any) -> None:
            step_ends.append(time.perf_counter())

        def on_step_end(self, *_: Any, **__: Any) -> None:
            step_ends.append(time.perf_counter())

    trainer.add_callback(StepClock())
    trainer.train()
    totals = [b - a for a, b in pairwise(step_ends)]
    if len(totals) != iterations or len(gen_s) != iterations:
        raise RuntimeError(f"expected {iterations} steps and generations, saw {len(totals)} and {len(gen_s)}")
    rewards = [row["rewards/math_correct/mean"] for row in trainer.state.log_history
               if "rewards/math_correct/mean" in row]
    keep = slice(args.warmup, None)  # warm-up iterations are run, not reported
    return {
        "setup_s": setup_s,
        # generate_s is generation plus scoring, as on the exitagent side; update_s the rest of the step
        "generate_s": gen_score_s[keep], "generate_only_s": gen_s[keep], "total_s": totals[keep],
        "update_s": [t - g for t, g in zip(totals, gen_score_s, strict=True)][keep],
        "tokens": tokens[keep], "reward_mean": rewards[keep], "warmup_total_s": totals[:args.warmup],
        # TRL trains every completion, zero advantage or not
        "sequences": [args.prompts * args.samples] * args.steps,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", default="float32", choices=("bfloat16", "float32"),
                        help="bfloat16: bf16 autocast; fp32 weights either way")
    result = run(parser.parse_args())
    print(json.dumps(result), flush=True)
    os._exit(0)  # the evaluator's worker processes and TRL's threads need not be waited for


if __name__ == "__main__":
    main()
