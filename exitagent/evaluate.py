"""K-step inference-time self-improvement evaluation (exit-spec.md section 7).

    python -m exitagent.evaluate --base-url http://127.0.0.1:8000/v1 --domain math \\
        --source arithmetic --split heldout --n-tasks 1200 --out eval/base.json
    python -m exitagent.evaluate --base-url URL --tasks problems.jsonl --steps 4 --samples 4 --out eval/mine.json

For each task and each of the n ``--samples`` trajectories: y^0 answers the plain request (one
request with ``n=samples`` per task), then ``--steps`` K improve steps, each a separate request that
sees ONLY the request and the latest iterate, through the prompt training uses
(``iterates.iterate_messages``, i.e. ``prompts.step_messages``: the improve instruction with the
request and the current response, the request appearing once). No correctness feedback. Every iterate is
scored.

The defaults are the paper's protocol (exit-spec.md section 7): avg@8 (``--samples 8``) sampled at
the temperature the policy was trained at (``exitagent.policy.TRAINING_TEMPERATURE``), K = 16
(``--steps``; tool use: 4 revisions per turn, ``curriculum/paper.py``). Base and trained policies
must be measured with the same flags to be compared.

Reported in ``--out`` (JSON; a curve goes next to it, same stem, ``.png``):

- ``accuracy_by_step[k]``, k = 0..K: the mean score of the k-th iterates over tasks and samples
  (avg@n). ``--temperature 0 --samples 1`` is a greedy run. ``score`` names what it measures:
  ``accuracy`` (math), ``first_request_accuracy`` (tool use: the paper's headline), the domain's
  ``score_name``.
- ``secondary``: a domain's other per-iterate scores (``Step.secondary``; tool use:
  ``all_requests_accuracy``, BFCL's entry accuracy), each with its own ``accuracy_by_step``,
  ``delta_k``, net corrections and ``intervals``, reported after the headline.
- ``intervals``: a 95% interval for every accuracy, every Delta_k and the net corrections, by a
  paired bootstrap over tasks (``exitagent.stats``; null with fewer than two tasks).
- ``greedy``: the same metrics (and intervals) of a second, greedy pass (temperature 0, one sample
  per task), the old protocol's numbers as a secondary column; ``--no-greedy`` skips it, and a
  greedy main pass has none. It costs tasks x (K + 1) requests beside the main pass's
  tasks x (1 + n K) (y^0's n samples are one request).
- ``delta_k`` = accuracy[K] - accuracy[0], and ``net_corrections`` = (wrong -> right) - (right ->
  wrong) between y^0 and y^K of the same trajectory; ``corrections_by_step`` the same between
  steps k-1 and k. "Right" means a score of ``RIGHT_AT`` (math: correct).
- Evaluator failures (``EvaluatorError``) are counted per step and the iterate is left out of the
  averages and of every transition it is part of: never scored 0. So each step's mean is over
  ``scored_by_step[k]`` iterates, and equals avg@n whenever nothing failed.
- A step whose prompt would not fit ``--max-context`` keeps the latest iterate (no room to revise
  it): ``context_full_by_step``. Answers cut off at ``--max-tokens``: ``truncated_by_step``.
- ``policy_versions``: each version the server tagged a sample with, and how many (``unknown``
  for servers other than ``exitagent.serve``). More than one means the weights changed mid-run.

``--concurrency`` is the number of tasks in flight; each runs its n trajectories at once, so up to
``concurrency x samples`` answers are generated together. Exit codes: 0 done, 1 the server failed,
2 bad configuration. ``--domain`` picks the task domain (``exitagent.domains``): it loads the
tasks, opens the evaluator and runs each task's trajectories; its extras (``TaskResult.metrics``)
are averaged into ``domain_metrics``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import structlog

from evaluators.base import Evaluator
from exitagent import curves, routing
from exitagent.config import add_arguments, from_args, parse_args, to_json
from exitagent.curriculum import paper
from exitagent.domains import DOMAINS, Domain, DomainSettings, TaskSpec, default_source, get_domain
from exitagent.domains.base import N_TASKS_FLAGS, SOURCE_FLAGS, SOURCE_HELP, SPLIT_FLAGS, DomainFlags
from exitagent.errors import ConfigError, ExitAgentError, ExitCode, fail
from exitagent.eval_result import EvalResult, summarize
from exitagent.log import configure
from exitagent.policy import DEFAULT_PARAMS, TRAINING_TEMPERATURE, Policy, SamplingParams
from exitagent.routing import RoutedPolicy
from exitagent.trajectories import TaskResult
from exitagent.types import Task

log = structlog.get_logger(__name__)

SCHEMA = "exitagent.evaluate/1"
# The paper's protocol (exit-spec.md section 7, math): avg@8, K = 16, at the training temperature.
# Other domains' K: curriculum/paper.py (tool use 4), the default of --steps.
PAPER_SAMPLES, PAPER_STEPS = 8, paper.eval_steps("math")
# Held-out tasks for a 95% interval of Delta_16 of about +-1.5 points at avg@8 (README, "What the
# evaluation protocol costs": from a measured per-task spread of Delta_K).
FULL_SIZE_TASKS = 1200


@dataclass(frozen=True)
class EvalConfig(DomainFlags):
    out: Path = field(metadata={"help": "result JSON (the curve goes next to it as .png)"})
    base_url: tuple[str, ...] = field(default=("http://127.0.0.1:8000/v1",), metadata={
        "help": "OpenAI-compatible policy server; several: each task goes to the least busy (exitagent.routing)"})
    model: str = field(default="policy", metadata={"help": "served model name"})
    api_key: str | None = field(default=None, metadata={"help": "API key of the server (never written out)"})
    domain: str = field(default="math", metadata={
        "help": f"task domain: {', '.join(DOMAINS)}, or your own as package.module:NAME (docs/environments.md)"})
    source: str = field(default="", metadata={"help": SOURCE_HELP, "flags": SOURCE_FLAGS})
    split: str = field(default="heldout", metadata={"help": "split (heldout: a benchmark's own test split)",
                                                    "flags": SPLIT_FLAGS})
    tasks: Path | None = field(default=None, metadata={"help": "a .jsonl of {id, problem, answer} (beats --source)"})
    n_tasks: int | None = field(default=None, metadata={"help": "tasks to evaluate (arithmetic: 100; files: all)",
                                                        "flags": N_TASKS_FLAGS})
    levels: str = field(default="", metadata={"help": "arithmetic levels, comma-separated (empty: all)"})
    seed: int = field(default=0, metadata={"help": "seeds the task draw"})
    steps: int | None = field(default=None, metadata={"help": (
        f"K: improve steps after the first attempt (default: the paper's for the domain, math "
        f"{paper.eval_steps('math')}, tool use {paper.eval_steps('tool_use')} revisions per turn)")})
    samples: int = field(default=PAPER_SAMPLES, metadata={"help": "n: trajectories per task (avg@n)"})
    temperature: float = field(default=TRAINING_TEMPERATURE, metadata={
        "help": "sampling temperature (default: the one training samples at)"})
    greedy: bool = field(default=True, metadata={
        "help": "also a greedy one-sample pass, reported as `greedy` (skipped when --temperature is 0)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling"})
    max_tokens: int = field(default=1024, metadata={"help": "completion tokens per iterate"})
    concurrency: int = field(default=8, metadata={"help": "tasks in flight (each runs its n trajectories at once)"})
    server_deadline_s: float = field(default=300.0, metadata={"help": "how long to retry a failing server (s)"})
    failover_s: float = field(default=30.0, metadata={
        "help": "with several servers: how long one may fail before its task moves to another (s)"})
    keep_texts: bool = field(default=False, metadata={"help": "write every iterate's text into the JSON"})
    progress: bool = field(default=True, metadata={"help": "progress bar on stderr"})
    log_level: str = field(default="info", metadata={"help": "debug, info, warning or error"})

    def __post_init__(self) -> None:
        # the saved config names the source that ran, also when it was the domain's default
        object.__setattr__(self, "source", self.source or default_source(get_domain(self.domain)))
        object.__setattr__(self, "base_url", routing.urls(self.base_url))
        object.__setattr__(self, "steps", self.k)  # the saved config shows the K that ran
        if self.k < 0 or min(self.samples, self.concurrency, self.max_tokens) < 1:
            raise ConfigError("steps must be >= 0; samples, concurrency and max-tokens >= 1")

    @property
    def k(self) -> int:
        """``steps``, or the paper's K for the domain when it was not given."""
        return paper.eval_steps(self.domain) if self.steps is None else self.steps

    def sampling(self) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p)

    @property
    def greedy_pass(self) -> bool:
        return self.greedy and self.temperature > 0

    def task_spec(self) -> TaskSpec:
        levels = tuple(level.strip() for level in self.levels.split(",") if level.strip()) or None
        source = str(self.tasks) if self.tasks is not None else self.source
        return TaskSpec(source, self.split, self.n_tasks, self.seed, levels)

    def as_json(self) -> dict[str, Any]:
        values = json.loads(to_json(self))
        values["api_key"] = "(set)" if self.api_key else None  # a secret never goes into a result file
        return dict(values)


async def evaluate(policy: Policy, evaluator: Evaluator, tasks: Sequence[Task], steps: int, samples: int, *,
                   params: SamplingParams = DEFAULT_PARAMS, concurrency: int = 8, domain: Domain | None = None,
                   settings: DomainSettings | None = None,
                   on_progress: Callable[[int], object] | None = None) -> EvalResult:
    """y^0 then ``steps`` improve steps for ``samples`` trajectories of every task, scored; the metrics.

    ``domain`` runs each task's trajectories (default: math's first answer + K improve steps).

    ``concurrency`` tasks run at once. ``on_progress(k)`` is called as k more iterates are scored
    (there are ``len(tasks) * samples * (steps + 1)``). Raises ``ServerError`` when the policy
    server fails (after its client's retries); an evaluator failure is data (module docstring).
    """
    start, limiter = time.monotonic(), anyio.CapacityLimiter(concurrency)
    results: list[TaskResult | None] = [None] * len(tasks)
    tick = on_progress or (lambda _: None)
    runner, knobs = domain or get_domain("math"), settings or DomainSettings(max_context=policy.max_context)

    async def run(index: int) -> None:
        async def on(server: Policy) -> TaskResult:  # a task's steps stay on one server (exitagent.routing)
            return await runner.evaluate_task(server, evaluator, tasks[index], steps=steps, samples=samples,
                                              params=params, settings=knobs, tick=tick)

        async with limiter:
            results[index] = await (policy.run_pinned(on) if isinstance(policy, RoutedPolicy) else on(policy))

    log.info("evaluation_started", tasks=len(tasks), steps=steps, samples=samples, concurrency=concurrency)
    try:
        async with anyio.create_task_group() as group:
            for index in range(len(tasks)):
                group.start_soon(run, index)
    except BaseExceptionGroup as errors:  # callers see the ServerError itself, not a task-group wrapper
        ours, _ = errors.split(ExitAgentError)
        raise _first_leaf(ours or errors) from None
    # A domain may name its headline score (tool use: first-request accuracy); optional, so that an
    # environment written against the public API (docs/environments.md) needs nothing new.
    result = summarize([r for r in results if r is not None], steps, samples, time.monotonic() - start,
                       score=getattr(runner, "score_name", "accuracy"))
    if len(result.policy_versions) > 1:
        log.warning("policy_changed_during_evaluation", versions=result.policy_versions)
    log.info("evaluation_finished", accuracy_by_step=result.accuracy_by_step, delta_k=result.delta_k,
             net_corrections=result.net_corrections, evaluator_failures=sum(result.failures_by_step),
             elapsed_s=result.elapsed_s)
    return result


def _first_leaf(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


# --- output and the command line ------------------------------------------------------------------


def write_report(cfg: EvalConfig, result: EvalResult) -> None:
    """``cfg.out`` (JSON) and the same stem's ``.png``, each written completely before it appears."""
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    body = {"schema": SCHEMA, "domain": cfg.domain, "config": cfg.as_json(),
            **result.to_json(keep_texts=cfg.keep_texts)}
    tmp = cfg.out.with_name(cfg.out.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=1, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, cfg.out)
    source = cfg.tasks.name if cfg.tasks is not None else f"{cfg.source or cfg.domain}/{cfg.split}"
    curves.plot_evaluation(body, cfg.out.with_suffix(".png"), f"{cfg.domain}: {source}, {len(result.tasks)} tasks")


async def _main(cfg: EvalConfig) -> EvalResult:
    from tqdm import tqdm

    domain = get_domain(cfg.domain)
    tasks = domain.load_tasks(cfg.task_spec())
    policy = routing.open_servers(cfg.base_url, deadline_s=cfg.server_deadline_s, failover_s=cfg.failover_s,
                                  model=cfg.model, api_key=cfg.api_key, require_token_ids=False,
                                  max_context=cfg.max_context)
    bar = tqdm(total=len(tasks) * (cfg.samples + cfg.greedy_pass) * (cfg.k + 1), unit="iterate",
               file=sys.stderr, disable=not cfg.progress, dynamic_ncols=True, desc="evaluate")
    try:
        async with policy, domain.open_evaluator(cfg.settings()) as evaluator:
            await policy.check_same_base()
            result = await evaluate(policy, evaluator, tasks, cfg.k, cfg.samples, params=cfg.sampling(),
                                    concurrency=cfg.concurrency, domain=domain, settings=cfg.settings(),
                                    on_progress=bar.update)
            if cfg.greedy_pass:  # same tasks, temperature 0, one sample: the secondary column
                greedy = await evaluate(policy, evaluator, tasks, cfg.k, 1,
                                        params=dataclasses.replace(cfg.sampling(), temperature=0.0),
                                        concurrency=cfg.concurrency * cfg.samples, domain=domain,
                                        settings=cfg.settings(), on_progress=bar.update)
                result = dataclasses.replace(result, greedy=greedy)
    finally:
        bar.close()
    write_report(cfg, result)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exitagent.evaluate", description=__doc__.split("\n\n")[0])
    add_arguments(parser, EvalConfig)
    try:
        cfg = from_args(EvalConfig, parse_args(parser, argv, "evaluate"))
        configure(level=cfg.log_level)
        result = anyio.run(_main, cfg)
    except ExitAgentError as error:
        return fail(error, "evaluate")
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    print(f"evaluate: {summary_line(result)} -> {cfg.out}", file=sys.stderr)
    return ExitCode.OK


def summary_line(result: EvalResult) -> str:
    """The headline score at 0 and K, Delta_K and net corrections, each with its 95% interval (in
    points); then each secondary score the same way, then the greedy pass."""
    headline = {"accuracy_by_step": result.accuracy_by_step, "delta_k": result.delta_k,
                "net_corrections": result.net_corrections, "intervals": result.intervals}
    line = (f"avg@{result.samples} {_curve_line(curves.score_label(result.score), headline, result.steps)}"
            f", {sum(result.failures_by_step)} evaluator failures")
    for name, secondary in result.secondary.items():
        line += f"; {_curve_line(curves.score_label(name), secondary, result.steps)}"
    if result.greedy is not None:
        line += f"; greedy: {summary_line(result.greedy)}"
    return line


def _curve_line(label: str, curve: dict[str, Any], steps: int) -> str:
    bands = curve.get("intervals") or {}
    ends = bands.get("accuracy_by_step") or [None] * (steps + 1)
    net = bands.get("net_corrections")
    accuracy = curve["accuracy_by_step"]
    return (f"{label} at k=0 {curves.with_interval(accuracy[0], ends[0])}, "
            f"at k={steps} {curves.with_interval(accuracy[-1], ends[-1])}, Delta_{steps} "
            f"{curves.with_interval(curve['delta_k'], bands.get('delta_k'), sign=True)} points (95% intervals), net "
            f"corrections {curve['net_corrections']:+d}" + (f" [{net['low']:+.0f}, {net['high']:+.0f}]" if net else ""))


if __name__ == "__main__":
    sys.exit(main())
