"""The main job on the embedded default (the README's run command calls this).

    python -m exitagent.run [--run-dir runs/demo]

For now it starts ``serve`` on the packaged model, asks it one question through the OpenAI API,
prints the answer with the policy version that produced it, and stops the server again. The
full ExIt training run (serve + collect + update, evaluation and report) replaces this body.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import httpx

from exitagent import launch
from exitagent import log as logging_setup
from exitagent.errors import ExitAgentError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exitagent.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    parser.add_argument("--question", default="What is 12 + 7? Answer with the number only.")
    args = parser.parse_args(argv)
    logging_setup.configure()
    args.run_dir.mkdir(parents=True, exist_ok=True)
    print(f"starting the server on the packaged model (logs in {args.run_dir}/logs) ...", flush=True)
    try:
        server = launch.start_serve(args.run_dir, "--kv-cache-gib", "2")
    except ExitAgentError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        response = httpx.post(f"{server.base_url}/chat/completions", timeout=120, json={
            "model": "policy", "messages": [{"role": "user", "content": args.question}],
            "max_tokens": 64, "temperature": 0.0,
        })
        response.raise_for_status()
        answer = response.json()["choices"][0]["message"]["content"]
        print(f"server: {server.base_url}\npolicy: {response.headers.get('x-exitagent-policy-version')}\n"
              f"question: {args.question}\nanswer: {answer}")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
