"""K-step evaluation with a scripted policy whose trajectories are known, and the real math evaluator.

Each scripted response names its trajectory and step ("p1-0: \\boxed{5}") so the script can follow
a trajectory by its latest iterate, which is all an improve step shows the policy. The answers are
plain numbers, so ``MathEvaluator`` settles them in-process (no math-verify worker starts).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from collections.abc import Iterator, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog

from evaluators.base import ExactMatchEvaluator
from evaluators.math import MathEvaluator
from exitagent.domains import DOMAINS
from exitagent.errors import ExitCode
from exitagent.evaluate import EvalConfig, EvalResult, evaluate, main, summarize, summary_line, write_report
from exitagent.policy import DEFAULT_PARAMS, SamplingParams, ScriptedPolicy
from exitagent.prompts import IMPROVE_INSTRUCTION, step_messages
from exitagent.trajectories import Step, TaskResult
from exitagent.types import Message, Sample, StepKind, Task

pytestmark = pytest.mark.anyio

P = Task("p", "math", "What is 2 + 2?", answer="4")
Q = Task("q", "math", "What is 3 * 3?", answer="9")
# task prompt -> its n = 2 trajectories, each y^0..y^2 as (tag, boxed answer)
TRAJECTORIES = {
    P.prompt: [[("p1-0", 5), ("p1-1", 4), ("p1-2", 4)],   # wrong -> right -> right
        [("p2-0", 4), ("p2-1", 3), ("p2-2", 3)]],  # right -> wrong -> wrong
    Q.prompt: [[("q1-0", 8), ("q1-1", 7), ("q1-2", 9)],   # wrong -> wrong -> right
        [("q2-0", 9), ("q2-1", 1), ("q2-2", 9)]],  # right -> wrong -> right
}
CURRENT = re.compile(r"## Current response:\n(.*)\Z", re.DOTALL)


@pytest.fixture(autouse=True)
def default_logging() -> Iterator[None]:
    """An entry point's ``configure`` (here, or in an earlier test module) binds structlog to the
    stderr pytest captured for that test and closes afterwards: log to the defaults in between."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


def text(tag: str, answer: int) -> str:
    return f"{tag}: the answer is \\boxed{{{answer}}}"


def chains(trajectories: dict[str, list[list[Any]]]) -> Any:
    """A script: first attempts in trajectory order, then each iterate's scripted successor."""
    firsts = {prompt: [text(*run[0]) for run in runs] for prompt, runs in trajectories.items()}
    successor = {text(*a): text(*b) for runs in trajectories.values() for run in runs for a, b in pairwise(run)}

    def script(messages: Sequence[Message]) -> str:
        match = CURRENT.search(messages[-1].content)  # None: a first attempt, the plain request
        if match is None:
            return firsts[messages[0].content].pop(0)
        return successor[match.group(1)]

    return script


async def run(policy: ScriptedPolicy, tasks: list[Task], steps: int = 2, samples: int = 2, **kw: Any) -> EvalResult:
    async with MathEvaluator(workers=1) as evaluator:
        return await evaluate(policy, evaluator, tasks, steps, samples, **kw)


async def test_metrics_are_exact_on_known_trajectories() -> None:
    result = await run(ScriptedPolicy(chains(TRAJECTORIES)), [P, Q])
    assert result.accuracy_by_step == (0.5, 0.25, 0.75)
    assert result.delta_k == 0.25
    assert result.net_corrections == 1  # p1 and q1 corrected, p2 broken, q2 right at both ends
    assert result.corrections == {"wrong_to_right": 2, "right_to_wrong": 1, "net": 1}
    assert result.corrections_by_step == ({"wrong_to_right": 1, "right_to_wrong": 2, "net": -1},
                                          {"wrong_to_right": 2, "right_to_wrong": 0, "net": 2})
    assert result.scored_by_step == (4, 4, 4) and result.failures_by_step == (0, 0, 0)
    assert result.policy_versions == {"base": 12}
    scores = {r.task.id: sorted([s.score for s in t] for t in r.trajectories) for r in result.tasks}
    assert scores == {"p": [[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]], "q": [[0.0, 0.0, 1.0], [1.0, 0.0, 1.0]]}


async def test_steps_see_only_the_request_and_the_latest_iterate() -> None:
    policy = ScriptedPolicy(chains(TRAJECTORIES))
    await run(policy, [P, Q], concurrency=1)
    firsts = [call for call in policy.calls if not CURRENT.search(call[-1].content)]
    improves = [call for call in policy.calls if CURRENT.search(call[-1].content)]
    assert sorted(c[0].content for c in firsts) == [P.prompt, Q.prompt]  # one n=2 request per task
    assert len(improves) == 2 * 2 * 2  # tasks x samples x K, one request each
    for call in improves:
        request = next(t.prompt for t in (P, Q) if f"## Request:\n{t.prompt}\n" in call[-1].content)
        current = CURRENT.search(call[-1].content).group(1)  # type: ignore[union-attr]
        assert tuple(call) == step_messages(StepKind.IMPROVE, request, (), current)  # the training prompt
        assert sum(m.content.count(request) for m in call) == 1  # the paper's template alone
        assert call[-1].content.startswith(IMPROVE_INSTRUCTION)
        tag = current.split(":")[0]
        assert all(f"{tag[:2]}-{k}" not in call[-1].content for k in range(int(tag[-1])))  # no older iterate


async def test_evaluator_failures_are_excluded_not_zero() -> None:
    tasks = [Task("a", "math", "a?", answer="4"), Task("b", "math", "b?", answer="4")]
    script = {"a?": "5", "5": "boom", "boom": "4", "b?": "3", "3": "4", "4": "4"}

    def answer(messages: Sequence[Message]) -> str:
        match = CURRENT.search(messages[-1].content)
        return script[match.group(1) if match else messages[0].content]

    result = await evaluate(ScriptedPolicy(answer), ExactMatchEvaluator(failing={"boom"}), tasks, 2, 1)
    assert result.accuracy_by_step == (0.0, 1.0, 1.0)  # step 1 is b's 1.0 alone; a 0 there would make 0.5
    assert result.scored_by_step == (2, 1, 2) and result.failures_by_step == (0, 1, 0)
    assert result.corrections_by_step == ({"wrong_to_right": 1, "right_to_wrong": 0, "net": 1},
                                          {"wrong_to_right": 0, "right_to_wrong": 0, "net": 0})
    assert (result.delta_k, result.net_corrections) == (1.0, 2)
    assert result.to_json()["evaluator_failures"] == 1


async def test_a_step_that_does_not_fit_keeps_the_latest_iterate() -> None:
    # one token per character: the request fits in 80 tokens, an improve prompt (~140) does not
    policy = ScriptedPolicy(lambda messages: "\\boxed{4}", max_context=80)
    result = await run(policy, [P], steps=2, samples=2, params=SamplingParams(max_tokens=16))
    assert len(policy.calls) == 1
    assert result.context_full_by_step == (0, 2, 2)
    assert result.accuracy_by_step == (1.0, 1.0, 1.0) and result.policy_versions == {"base": 2}


async def test_concurrency_bounds_the_tasks_in_flight() -> None:
    class SlowPolicy(ScriptedPolicy):
        in_flight: set[str]
        most = 0

        async def sample(self, messages: Sequence[Message], *, n: int = 1, params: SamplingParams = DEFAULT_PARAMS,
                         tools: Any = None) -> list[Sample]:
            self.in_flight.add(messages[0].content)
            self.most = max(self.most, len(self.in_flight))
            await anyio.sleep(0.01)
            self.in_flight.discard(messages[0].content)
            return await super().sample(messages, n=n, params=params)

    tasks = [Task(f"t{i}", "math", f"{i} + 0?", answer=str(i)) for i in range(5)]
    policy = SlowPolicy(lambda messages: "\\boxed{0}")
    policy.in_flight = set()
    result = await run(policy, tasks, steps=1, samples=1, concurrency=2)
    assert policy.most == 2 and len(result.tasks) == 5
    assert result.accuracy_by_step == (0.2, 0.2)


async def test_a_server_that_ignores_n_is_asked_again() -> None:
    class OneAtATime(ScriptedPolicy):
        async def sample(self, messages: Sequence[Message], *, n: int = 1, params: SamplingParams = DEFAULT_PARAMS,
                         tools: Any = None) -> list[Sample]:
            return await super().sample(messages, n=1, params=params)

    policy = OneAtATime(chains(TRAJECTORIES))
    result = await run(policy, [P, Q])
    assert result.accuracy_by_step == (0.5, 0.25, 0.75)
    assert sum(not CURRENT.search(call[-1].content) for call in policy.calls) == 4  # two requests per task for y^0


def test_summarize_with_no_scored_iterate_has_no_accuracy() -> None:
    result = summarize([], steps=2, samples=1)
    assert result.accuracy_by_step == (None, None, None) and result.delta_k is None and result.net_corrections == 0


async def test_report_json_schema_and_curve(tmp_path: Path) -> None:
    result = await run(ScriptedPolicy(chains(TRAJECTORIES)), [P, Q])
    cfg = EvalConfig(out=tmp_path / "eval" / "base.json", steps=2, samples=2, api_key="secret", keep_texts=True)
    write_report(cfg, result)
    body = json.loads(cfg.out.read_text())
    assert body["schema"] == "exitagent.evaluate/1" and body["domain"] == "math"
    assert body["accuracy_by_step"] == [0.5, 0.25, 0.75] and body["delta_k"] == 0.25 and body["net_corrections"] == 1
    assert (body["num_tasks"], body["num_trajectories"], body["evaluator_failures"]) == (2, 4, 0)
    assert body["config"]["steps"] == 2 and body["config"]["out"] == str(cfg.out)
    assert body["config"]["api_key"] == "(set)" and "secret" not in cfg.out.read_text()
    assert len(body["corrections_by_step"]) == 2 and body["policy_versions"] == {"base": 12}
    row = next(r for r in body["per_task"] if r["id"] == "p")
    assert row["answer"] == "4" and len(row["scores"]) == 2 and len(row["texts"][0]) == 3
    assert cfg.out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in cfg.out.parent.iterdir()) == ["base.json", "base.png"]  # no temporaries left


def test_task_sources(tmp_path: Path) -> None:
    problems = tmp_path / "mine.jsonl"
    rows = [{"id": "x1", "problem": "1 + 1?", "answer": "2"}, {"id": "x2", "problem": "2 + 2?", "answer": "4"}]
    problems.write_text("".join(json.dumps(row) + "\n" for row in rows))
    def load(cfg: EvalConfig) -> list[Task]:
        return DOMAINS["math"].load_tasks(cfg.task_spec())

    assert [t.id for t in load(EvalConfig(out=tmp_path / "o.json", tasks=problems))] == ["x1", "x2"]
    assert len(load(EvalConfig(out=tmp_path / "o.json", source="math500", n_tasks=3))) == 3  # heldout -> test
    arithmetic = load(EvalConfig(out=tmp_path / "o.json", levels="add2,mul2"))
    assert len(arithmetic) == 100 and {t.metadata["split"] for t in arithmetic} == {"heldout"}


@pytest.mark.parametrize("flags", [["--domain", "chess"], ["--steps", "-1"], ["--samples", "0"],
                                   ["--source", "nope"]])
def test_command_line_rejects_bad_configuration(tmp_path: Path, flags: list[str]) -> None:
    assert main(["--out", str(tmp_path / "o.json"), "--no-progress", *flags]) == 2
    assert not (tmp_path / "o.json").exists()


def test_command_line_reports_a_dead_server(tmp_path: Path) -> None:
    flags = ["--base-url", "http://127.0.0.1:9/v1", "--server-deadline-s", "0.2", "--n-tasks", "2", "--no-progress"]
    assert main(["--out", str(tmp_path / "o.json"), *flags]) == ExitCode.UNAVAILABLE  # docs/exit-codes.md
    assert not (tmp_path / "o.json").exists()


def test_defaults_are_the_papers_protocol_at_the_training_temperature(tmp_path: Path) -> None:
    from exitagent.collect import CollectConfig
    from exitagent.config import add_arguments, from_args
    from exitagent.policy import TRAINING_TEMPERATURE
    from exitagent.run import RunConfig
    from training.config import UpdateConfig

    parser = argparse.ArgumentParser()
    add_arguments(parser, EvalConfig)
    cfg = from_args(EvalConfig, parser.parse_args(["--out", str(tmp_path / "o.json")]))
    assert (cfg.samples, cfg.steps, cfg.temperature) == (8, 16, TRAINING_TEMPERATURE)
    tools = from_args(EvalConfig, parser.parse_args(["--out", "o.json", "--domain", "tool_use"]))
    assert tools.steps == tools.k == 4  # the paper's tool-use K (revisions per turn): curriculum/paper.py
    assert from_args(EvalConfig, parser.parse_args(["--out", "o.json", "--domain", "tool_use", "--steps", "2"])).k == 2
    assert cfg.sampling().temperature == RunConfig().temperature == TRAINING_TEMPERATURE == 0.7
    assert CollectConfig.__dataclass_fields__["temperature"].default == TRAINING_TEMPERATURE
    assert UpdateConfig.__dataclass_fields__["temperature"].default == TRAINING_TEMPERATURE
    assert cfg.greedy_pass  # the greedy secondary column is on by default ...
    greedy = from_args(EvalConfig, parser.parse_args(["--out", "o.json", "--temperature", "0", "--samples", "1"]))
    assert not greedy.greedy_pass  # ... and not repeated when the main pass is greedy already
    assert not from_args(EvalConfig, parser.parse_args(["--out", "o.json", "--no-greedy"])).greedy_pass


async def test_every_metric_carries_its_interval_and_the_greedy_column(tmp_path: Path) -> None:
    sampled = await run(ScriptedPolicy(chains(TRAJECTORIES)), [P, Q])
    greedy = summarize(sampled.tasks[:2], steps=2, samples=1)
    cfg = EvalConfig(out=tmp_path / "e.json", steps=2, samples=2)
    write_report(cfg, dataclasses.replace(sampled, greedy=greedy))
    body = json.loads(cfg.out.read_text())
    bands = body["intervals"]
    assert bands["tasks"] == 2 and bands["level"] == 0.95
    assert [b["estimate"] for b in bands["accuracy_by_step"]] == pytest.approx([0.5, 0.25, 0.75])
    assert all(b["low"] <= b["estimate"] <= b["high"] for b in bands["accuracy_by_step"])
    assert bands["delta_k"]["estimate"] == pytest.approx(body["delta_k"])
    assert bands["net_corrections"]["estimate"] == body["net_corrections"]
    assert body["greedy"]["samples"] == 1 and body["greedy"]["intervals"]["delta_k"] is not None
    line = summary_line(dataclasses.replace(sampled, greedy=greedy))
    assert "Delta_2 +25.0 [" in line and "; greedy: avg@1" in line


def test_one_task_has_no_interval_rather_than_a_false_one() -> None:
    steps = tuple(Step("x", s, "base") for s in (0.0, 1.0))
    result = summarize([TaskResult(P, (steps,))], steps=1, samples=1)
    assert result.intervals is None and result.delta_k == 1.0
    assert "Delta_1 +100.0 points" in summary_line(result)  # no bracket: nothing to claim
