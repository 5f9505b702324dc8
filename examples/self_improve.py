"""Ask a served policy to answer a math question, then to improve its answer a few times.

    python examples/self_improve.py http://127.0.0.1:8000/v1
    python examples/self_improve.py http://127.0.0.1:8000/v1 --steps 4 "What is 12 * 13?"

Any OpenAI-compatible server works; the model name defaults to "policy" (what exitagent.serve serves).
"""

from __future__ import annotations

import argparse
import asyncio

from exitagent import SelfImprovingAgent
from exitagent.log import configure
from exitagent.policy import SamplingParams


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base_url")
    parser.add_argument("question", nargs="?", default="What is 17 * 23?")
    parser.add_argument("--answer", default="391", help="the right answer, to score each iterate")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--model", default="policy")
    args = parser.parse_intermixed_args()
    configure(level="warning")  # the agent logs an event per call; keep the output to the answers

    def is_right(response: str) -> float:  # any function of the text works, sync or async
        return float(args.answer in response)

    request = f"{args.question}\n\nPut your final answer in \\boxed{{}}."
    async with SelfImprovingAgent(args.base_url, model=args.model, params=SamplingParams(max_tokens=256)) as agent:
        result = await agent.improve(request, steps=args.steps, evaluator=is_right)

    for iterate in result.iterates:
        print(f"--- step {iterate.step} (score {iterate.score}) ---\n{iterate.text.strip()}\n")
    if result.best is not None:
        print(f"best: step {result.best.step} with score {result.best.score}")


if __name__ == "__main__":
    asyncio.run(main())
