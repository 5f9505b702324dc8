"""The main job's evaluations: what they measure, when a saved one is reused, and the base cache.

``evaluate(cfg, servers, name)`` runs ``python -m exitagent.evaluate`` as a child on the run's
servers and keeps the result in ``RUN/eval/NAME.json``, with the key of what it measured
(``evaluation_key``: the served policy and the run's evaluation flags). It measures nothing when
an existing result fits:

- the same run directory already has it (a resumed run: ``saved_evaluation``);
- for the base policy, the cache shared by runs (``exitagent.eval_cache``) has an evaluation of the
  same served base weights with the same evaluation flags, tasks, prompt template and versions
  (``base_cache_inputs``). ``--eval-cache off`` turns that off.

``source`` picks the held-out set: None, the domain's own held-out split (math: the arithmetic
generator's; the report's headline), or ``wordproblems`` (the second held-out set, which the training generator
never produces; ``RUN/eval/NAME-wordproblems.json``, only with ``--eval-wordproblems``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exitagent import config
from exitagent.curriculum import paper
from exitagent.domains import default_source, get_domain
from exitagent.errors import ExitAgentError
from exitagent.eval_cache import EvalCache, default_dir
from exitagent.evaluate import FULL_SIZE_TASKS, PAPER_SAMPLES, SCHEMA, EvalConfig
from exitagent.models import DEFAULT_MODEL
from exitagent.prompts import step_messages
from exitagent.run_dir import RunDir
from exitagent.serving import engine, launch
from exitagent.types import StepKind

if TYPE_CHECKING:
    from exitagent.run_config import RunConfig

# If the orchestrator dies (kill -9 included), the kernel kills its children: collect, update and
# evaluate are built to survive SIGKILL at any point (a group, a saved state and an evaluation are
# each written completely or not at all), and a SIGTERM would let the trainer finish its step, far
# beyond the few seconds an orphan may live. serve gets SIGTERM instead (launch.start_serve) so that
# it stops its vLLM. Children are started from the main thread (see engine.die_with_parent).
ORPHAN_SIGNAL = signal.SIGKILL

# What an evaluation depends on besides the served policy: runs that agree on these measure the same thing.
EVALUATION_FIELDS = ("domain", "seed", "levels", "max_tokens", "eval_tasks", "eval_steps", "eval_samples",
                     "eval_temperature", "serve_flags", "precision")  # precision moves scores by points (runtime notes)
BASE_POLICY = "base"  # the version the server reports before any checkpoint is published
HELD_OUT = ("wordproblems",)  # held-out sets a run can evaluate on besides the domain's own (None)
WORD_PROBLEMS = 300  # the size of the second held-out set (evaluators/worlds/word_problems.py)
# Their answers need more room than arithmetic's: the base model at 64 tokens had 89 of 100 first
# answers cut (2% right), at 256 tokens 14 (6% right; greedy, bf16, 2026-12-02). Both policies get it.
WORD_PROBLEM_TOKENS = 256
# Evaluate flags that change how fast, not what, it measures; left out of the cache key.
_NOT_MEASURED = ("out", "base_url", "api_key", "concurrency", "server_deadline_s", "failover_s", "progress",
                 "log_level", "keep_texts")


def evaluation_key(cfg: RunConfig, policy: str, source: str | None = None) -> dict[str, Any]:
    """What an evaluation measured, stored in it as ``measured``: a saved one is reused only when it matches."""
    saved = json.loads(config.to_json(cfg))
    key = {**{name: saved[name] for name in EVALUATION_FIELDS}, "policy": policy}
    return key if source is None else {**key, "source": source}  # older runs' keys stay valid


def _label(name: str, source: str | None) -> str:
    return name if source is None else f"{name}-{source}"


def saved_evaluation(cfg: RunConfig, name: str, policy: str, source: str | None = None) -> dict[str, Any] | None:
    """RUN/eval/NAME.json if it measured ``policy`` (the version now served) with these flags; None
    when it must be measured (again)."""
    out = RunDir(cfg.run_dir).evaluation(_label(name, source))
    if not out.exists():
        return None
    saved = json.loads(out.read_text())
    if saved.get("measured") == evaluation_key(cfg, BASE_POLICY if name == "base" else policy, source):
        return dict(saved)  # a base evaluation measured the base weights, whatever is served now
    if name == "base" and policy != BASE_POLICY:
        raise ExitAgentError(f"{out} measured {saved.get('measured')}, but the base policy cannot be measured "
                             f"again here: the server now serves {policy}. Other evaluation flags need a new "
                             f"--run-dir ({out} is kept)")
    print(f"[run] the saved {name} evaluation measured {saved.get('measured')}; measuring again", flush=True)
    return None


def served_version(servers: list[launch.ServeProcess]) -> str:
    """The one version every server serves; an evaluation over servers that disagree would mix policies."""
    versions = {server.policy()["version"] for server in servers}
    if len(versions) != 1:
        raise ExitAgentError(f"the servers serve different versions {sorted(versions)}; evaluating needs one")
    return versions.pop()


def base_url_flags(servers: list[launch.ServeProcess]) -> list[str]:
    return [flag for server in servers for flag in ("--base-url", server.base_url)]


def evaluate_args(cfg: RunConfig, source: str | None = None) -> list[str]:
    """``exitagent.evaluate``'s flags that say what is measured (servers, output and concurrency aside)."""
    if source is not None and source not in HELD_OUT:
        raise ValueError(f"held-out set {source!r} is not one of {HELD_OUT}")
    if source is None:  # the domain's own held-out split, at the run's levels and answer length
        held_out = [*(("--levels", cfg.levels) if cfg.levels else ())]
        tasks, tokens = cfg.eval_tasks, cfg.max_tokens
    else:  # word problems: no levels, and answers that need more room
        held_out = ["--source", source]
        tasks, tokens = min(cfg.eval_tasks, WORD_PROBLEMS), max(cfg.max_tokens, WORD_PROBLEM_TOKENS)
    return ["--domain", cfg.domain, *held_out, "--split", "heldout", "--n-tasks", str(tasks),
            "--steps", str(cfg.eval_steps), "--samples", str(cfg.eval_samples), "--max-tokens", str(tokens),
            "--temperature", str(cfg.eval_temperature), "--seed", str(cfg.seed)]


def base_cache_inputs(cfg: RunConfig, base_model: Any, args: list[str]) -> dict[str, Any]:
    """Everything a base evaluation's result depends on: the served base weights (the server's
    fingerprint of them), every evaluate setting (defaults included), a digest of the tasks and of
    the improve prompt, how the server runs, and the versions of exitagent and vLLM."""
    parser = argparse.ArgumentParser(prog="exitagent.evaluate")
    config.add_arguments(parser, EvalConfig)
    evaluation = config.from_args(EvalConfig, parser.parse_args([*args, "--out", "-"]))
    settings = {k: v for k, v in evaluation.as_json().items() if k not in _NOT_MEASURED}
    tasks = get_domain(evaluation.domain).load_tasks(evaluation.task_spec())
    prompt = step_messages(StepKind.IMPROVE, "{request}", (), "{iterate}")
    return {"what": "base policy evaluation", "evaluate_schema": SCHEMA, "model": base_model, "settings": settings,
            "tasks": _digest([[t.id, t.prompt, str(t.answer)] for t in tasks]),
            "improve_prompt": _digest([dataclasses.asdict(m) for m in prompt]),
            "serve_flags": cfg.serve_flags, "precision": cfg.precision,
            "versions": {package: _version(package) for package in ("exitagent", "vllm")}}


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def cache_of(cfg: RunConfig) -> EvalCache | None:
    return None if cfg.eval_cache == "off" else EvalCache(Path(cfg.eval_cache) if cfg.eval_cache else default_dir())


def measure(cfg: RunConfig, servers: list[launch.ServeProcess], args: list[str], out: Path) -> None:
    """Run ``exitagent.evaluate`` with ``args`` on the run's servers, writing ``out`` and its ``.png``."""
    command = [sys.executable, "-m", "exitagent.evaluate", *base_url_flags(servers), *args, "--out", str(out),
               "--concurrency", str(max(1, cfg.eval_concurrency // cfg.eval_samples))]  # tasks x samples
    subprocess.run(command, check=True, stdin=subprocess.DEVNULL, preexec_fn=engine.die_with_parent(ORPHAN_SIGNAL))


Measure = Callable[["RunConfig", list[launch.ServeProcess], list[str], Path], None]


def evaluate(cfg: RunConfig, servers: list[launch.ServeProcess], name: str, source: str | None = None, *,
             measure: Measure = measure) -> dict[str, Any]:
    """Held-out ``source``, K self-improvement steps, avg@n; kept in RUN/eval/NAME.json (module docstring).
    ``measure`` runs the evaluation itself (tests pass a fake: no server needed)."""
    policy = served_version(servers)
    if (saved := saved_evaluation(cfg, name, policy, source)) is not None:
        return saved
    out = RunDir(cfg.run_dir).evaluation(_label(name, source))
    out.parent.mkdir(parents=True, exist_ok=True)
    args = evaluate_args(cfg, source)
    key = evaluation_key(cfg, BASE_POLICY if name == "base" else policy, source)
    weights = servers[0].policy().get("base")  # the base model's fingerprint, whatever version is served
    cache = cache_of(cfg) if name == "base" and weights else None  # no fingerprint: nothing to match on
    inputs = base_cache_inputs(cfg, weights, args) if cache is not None else {}
    if cache is not None and (hit := cache.load(inputs)) is not None:
        print(f"[run] base evaluation reused from {cache.path(inputs)} (same served base weights and evaluation "
              f"flags; --eval-cache off measures it again)", flush=True)
        return _keep(out, {**hit, "measured": key, "reused_from": str(cache.path(inputs))},
                     cache.path(inputs).with_suffix(".png"))
    if name == "base" and policy != BASE_POLICY:  # e.g. --eval-wordproblems first given to a resumed run
        raise ExitAgentError(f"the base policy cannot be measured here: the server now serves {policy}. "
                             f"Measure it in a new --run-dir ({out.name} is missing)")
    held_out = source or default_source(get_domain(cfg.domain)) or cfg.domain
    print(f"[run] evaluating the {name} policy on held-out {held_out} ({args[args.index('--n-tasks') + 1]} tasks, "
          f"K={cfg.eval_steps}, n={cfg.eval_samples}) ...", flush=True)
    measuring = out.with_name(f".{out.stem}.measuring.json")  # out appears only with its key in it
    measure(cfg, servers, args, measuring)
    measured = json.loads(measuring.read_text())
    result = _keep(out, {**measured, "measured": key}, measuring.with_suffix(".png"))
    if cache is not None:
        cache.store(inputs, measured, measuring.with_suffix(".png"))
    measuring.unlink()
    measuring.with_suffix(".png").unlink(missing_ok=True)
    print(f"[run] {name}: accuracy by step {[round(a, 3) for a in result['accuracy_by_step']]}", flush=True)
    return result


def _keep(out: Path, result: dict[str, Any], plot: Path) -> dict[str, Any]:
    """``out`` and its ``.png``, the JSON last and each complete: it is what marks the evaluation done."""
    if plot.exists():
        tmp = out.with_name(f".{out.stem}.tmp.png")
        shutil.copyfile(plot, tmp)
        os.replace(tmp, out.with_suffix(".png"))
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out)
    return result


def full_size_commands(cfg: RunConfig, checkpoint: Path | None) -> str:
    """What measures base and trained with the paper's protocol at full size (evaluate's defaults,
    ``FULL_SIZE_TASKS`` tasks), on the run's held-out levels and answer length, with identical flags."""
    levels = f"--levels {cfg.levels} " if cfg.levels else ""
    flags = (f"--domain {cfg.domain} {levels}--max-tokens {cfg.max_tokens} --seed {cfg.seed} "
             f"--temperature {cfg.temperature} --n-tasks {FULL_SIZE_TASKS}")  # the temperature it trained at
    lines = []
    for name, model in (("base", DEFAULT_MODEL), ("trained", checkpoint)):
        if model is None:
            continue
        out = RunDir(cfg.run_dir).eval / f"{name}-full.json"
        lines += [f"python -m exitagent.serve --model {model} --dtype {cfg.precision} --port 8000 &",
                  f"python -m exitagent.evaluate --base-url http://127.0.0.1:8000/v1 {flags} --out {out} "
                  "--server-deadline-s 900; kill %1  # the deadline covers the server's start-up"]
    return "\n".join(lines)


def full_size_note(cfg: RunConfig, checkpoint: Path | None) -> str:
    if (cfg.eval_samples >= PAPER_SAMPLES and cfg.eval_steps >= paper.eval_steps(cfg.domain)
            and cfg.eval_tasks >= FULL_SIZE_TASKS and cfg.eval_temperature == cfg.temperature):
        return ""
    return ("\nThis run's evaluation is smaller than the paper's protocol (avg@8 at the training temperature, "
            f"K = {paper.eval_steps(cfg.domain)}, {FULL_SIZE_TASKS} tasks), to fit the job's time budget. "
            f"Full size, base and trained with identical flags:\n\n```\n{full_size_commands(cfg, checkpoint)}\n```\n")
