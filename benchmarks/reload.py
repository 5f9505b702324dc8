"""Hot-reload latency on the default model: how long until a published checkpoint is served.

    .venv/bin/python benchmarks/reload.py [--rounds 5]

Starts a real ``exitagent.serve``, publishes ``--rounds`` checkpoints with changed weights the way
the trainer does (``training.publish.publish_model``), and prints per round: the time to write
and mark the checkpoint, publish-to-served latency (READY marker written -> the gateway's
``/policy`` reports the new version, which includes the poll interval, on-disk verification,
the reload and the canary check), and the raw reload time inside serve (pause -> version set).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import _machine
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from exitagent import models
from exitagent.serving import launch
from training.publish import publish_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--poll-s", type=float, default=0.2)
    args = parser.parse_args()
    _machine.print_machine()
    model_dir = models.resolve(models.DEFAULT_MODEL)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        print("starting serve (vLLM on the CPU takes a minute or two) ...", flush=True)
        server = launch.start_serve(Path(tmp), "--poll-s", str(args.poll_s), "--kv-cache-gib", "2")
        try:
            rows = []
            for step in range(1, args.rounds + 1):
                with torch.no_grad():  # a small real change, like an optimizer step
                    for parameter in model.parameters():
                        parameter.add_(torch.randn_like(parameter) * 1e-4)
                started = time.perf_counter()
                publish_model(model, tokenizer, server.weights_dir, step)
                published = time.perf_counter()
                info = server.wait_for_version(f"step-{step:06d}")
                served = time.perf_counter()
                rows.append((published - started, served - published, float(info["last_reload_s"])))
                print(f"round {step}: publish {rows[-1][0]:.2f} s, publish-to-served {rows[-1][1]:.2f} s, "
                      f"raw reload {rows[-1][2]:.2f} s", flush=True)
        finally:
            server.stop()
    print(f"\nmedian of {len(rows)}: publish (write + fsync + mark) {statistics.median(r[0] for r in rows):.2f} s | "
          f"publish-to-served {statistics.median(r[1] for r in rows):.2f} s | "
          f"raw reload (pause..version, incl. canary) {statistics.median(r[2] for r in rows):.2f} s")


if __name__ == "__main__":
    main()
