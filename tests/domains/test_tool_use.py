"""The tool-use domain with a scripted policy: episodes, scores, branches from turn k, evaluation."""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from evaluators.tool_use import ToolUseEvaluator
from evaluators.worlds.bfcl.calls import parse_call
from evaluators.worlds.bfcl.env import BfclEnv, Entry, get_entry
from evaluators.worlds.bfcl.toolbox import REVEAL, request_text, system_prompt
from exitagent.curriculum import CurriculumConfig, Start, plan_update
from exitagent.domains import DomainSettings, TaskSpec, get_domain
from exitagent.domains.tool_use import ToolUseDomain, task_of
from exitagent.errors import ConfigError
from exitagent.evaluate import EvalConfig, evaluate, summary_line, write_report
from exitagent.policy import SamplingParams, ScriptedPolicy
from exitagent.prompts import DIVERGE_INSTRUCTION, IMPROVE_INSTRUCTION
from exitagent.trajectories import TaskResult
from exitagent.types import BufferEntry, Message, PolicyVersion, StepKind, Variant

PARAMS = SamplingParams(max_tokens=400)
BIG = 400_000  # ScriptedPolicy counts a token per character: room for BFCL's schemas


def json_call(entry: Entry, call: str) -> str:
    """A ground-truth call string as the model's JSON action (positional arguments named)."""
    parsed = parse_call(call)
    env = BfclEnv.fresh(entry)
    method = getattr(env.instances[env.methods[parsed.name]], parsed.name)
    bound = inspect.signature(method).bind(*parsed.args, **parsed.kwargs)
    return "<tool>" + json.dumps({"name": parsed.name, "arguments": dict(bound.arguments)}) + "</tool>"


def is_iteration(message: Message) -> bool:
    return message.role == "user" and message.content.startswith((IMPROVE_INSTRUCTION, DIVERGE_INSTRUCTION))


def ground_truth_player(entry: Entry, wrong_at: tuple[int, int] | None = None):
    """Plays the ground truth: the j-th call of the current request, then <TASK_FINISHED>."""

    def play(messages: Sequence[Message]) -> str:
        requests = [i for i, m in enumerate(messages) if m.role == "user" and not is_iteration(m)]
        if is_iteration(messages[-1]):
            messages = messages[:-1]
        # An improve step on the first action is the template alone: request 0, nothing done yet.
        request = max(len(requests) - 1, 0)
        done = sum(m.role == "assistant" for m in messages[requests[-1]:]) if requests else 0
        calls = entry.ground_truth[request]
        if wrong_at == (request, done):
            return '<tool>{"name": "mkdir", "arguments": {"dir_name": "wrong"}}</tool>'
        return json_call(entry, calls[done]) if done < len(calls) else "<TASK_FINISHED>"

    return play


@pytest.fixture
def entry() -> Entry:
    return get_entry("multi_turn_base_0")  # 4 requests; the first takes cd, mkdir, mv


def settings(**kw: object) -> DomainSettings:
    return DomainSettings(max_context=BIG, **kw)  # type: ignore[arg-type]


def test_load_tasks_reads_the_split_and_refuses_other_sources() -> None:
    domain = get_domain("tool_use")
    test = domain.load_tasks(TaskSpec("bfcl", "test"))
    assert len(test) == 100 and test == domain.load_tasks(TaskSpec("base", "heldout"))
    assert not {t.id for t in test} & {t.id for t in domain.load_tasks(TaskSpec("base", "train"))}
    five = domain.load_tasks(TaskSpec("miss_func", "test", n=5, seed=3))
    assert len(five) == 5 and five == domain.load_tasks(TaskSpec("miss_func", "test", n=5, seed=3))
    assert all(t.id.startswith("multi_turn_miss_func_") and t.domain == "tool_use" for t in five)
    with pytest.raises(ConfigError):
        domain.load_tasks(TaskSpec("arithmetic", "train"))


@pytest.mark.anyio
async def test_roll_out_scores_the_first_request_and_returns_histories(entry: Entry) -> None:
    domain, task = ToolUseDomain(), task_of(entry)
    policy = ScriptedPolicy(ground_truth_player(entry), max_context=BIG)
    async with ToolUseEvaluator() as evaluator:
        rolled = await domain.roll_out(Start(task, StepKind.BASE), policy, evaluator, group_size=2, params=PARAMS,
                                       settings=settings())
    assert [r.reward for r in rolled.rollouts] == [1.0, 1.0]
    assert policy.calls[0][0].role == "system" and '"name": "mkdir"' in policy.calls[0][0].content
    assert rolled.histories is not None
    history = rolled.histories[0]
    assert [m.role for m in history] == ["assistant", "tool"] * 3 + ["assistant"]  # 3 calls, then finished
    assert history[1].content == '{"current_working_directory": "document"}'
    episode = rolled.rollouts[0].episode
    assert episode.sequences and len(episode.turns) == 4 and rolled.rollouts[0].score.components["requests"] == 1

    wrong = ScriptedPolicy(ground_truth_player(entry, wrong_at=(0, 1)), max_context=BIG)
    async with ToolUseEvaluator() as evaluator:
        rolled = await domain.roll_out(Start(task, StepKind.BASE), wrong, evaluator, group_size=1, params=PARAMS,
                                       settings=settings())
    assert rolled.rollouts[0].reward == 0.0


@pytest.mark.anyio
async def test_training_budget_is_ten_turns(entry: Entry) -> None:
    stubborn = ScriptedPolicy(lambda _: '<tool>{"name": "pwd", "arguments": {}}</tool>', max_context=BIG)
    async with ToolUseEvaluator() as evaluator:
        rolled = await ToolUseDomain().roll_out(Start(task_of(entry), StepKind.BASE), stubborn, evaluator,
                                                group_size=1, params=PARAMS, settings=settings())
    assert len(rolled.rollouts[0].episode.turns) == 10 and rolled.rollouts[0].reward == 0.0


def buffer_entries(entry: Entry, histories: Sequence[Sequence[Message]], rolled) -> list[BufferEntry]:
    config = CurriculumConfig.for_domain("tool_use", Variant.EXIT)
    group = rolled_group(entry, rolled)
    return list(plan_update(config, Start(task_of(entry), StepKind.BASE), group, histories).children)


def rolled_group(entry: Entry, rolled):
    from exitagent.types import Group

    return Group("g", entry.id, StepKind.BASE, Variant.EXIT, PolicyVersion(0, "base"), 0, rolled.rollouts)


@pytest.mark.anyio
@pytest.mark.parametrize("kind", [StepKind.IMPROVE, StepKind.DIVERGE, StepKind.REPLAY])
async def test_a_start_at_turn_k_resumes_the_environment_of_its_prefix(entry: Entry, kind: StepKind) -> None:
    domain, task = ToolUseDomain(), task_of(entry)
    async with ToolUseEvaluator() as evaluator:
        rolled = await domain.roll_out(Start(task, StepKind.BASE), ScriptedPolicy(ground_truth_player(entry),
                                       max_context=BIG), evaluator, group_size=1, params=PARAMS, settings=settings())
        children = buffer_entries(entry, rolled.histories, rolled)
        assert [c.start_turn for c in children] == [0, 1, 2, 3]  # every per-turn prefix is an entry
        child = children[2]  # before mv: cd and mkdir have run
        assert child.iterate.startswith("<tool>") and '"mv"' in child.iterate

        policy = ScriptedPolicy(ground_truth_player(entry), max_context=BIG)
        branch = await domain.roll_out(Start(task, kind, child), policy, evaluator, group_size=2, params=PARAMS,
                                       settings=settings())
    first, later = policy.calls[0], policy.calls[1]
    assert [m.role for m in first[1:]] == ["user", "assistant", "tool", "assistant", "tool"] + \
        (["user"] if kind is not StepKind.REPLAY else [])
    if kind is not StepKind.REPLAY:
        assert "## Current response:" in first[-1].content and '"mv"' in first[-1].content
    assert not any(is_iteration(m) for m in later)  # the continuation sees ordinary history
    assert [r.reward for r in branch.rollouts] == [1.0, 1.0]
    history = branch.histories[0]
    assert history[:4] == child.prefix and history[4].role == "assistant"
    assert len(history) == 7  # prefix (2 turns), the revised mv, its result, <TASK_FINISHED>


@pytest.mark.anyio
async def test_a_branch_from_turn_k_reproduces_the_original_state(entry: Entry) -> None:
    domain, task = ToolUseDomain(), task_of(entry)
    async with ToolUseEvaluator() as evaluator:
        rolled = await domain.roll_out(Start(task, StepKind.BASE), ScriptedPolicy(ground_truth_player(entry),
                                       max_context=BIG), evaluator, group_size=1, params=PARAMS, settings=settings())
    children = buffer_entries(entry, rolled.histories, rolled)
    for k, child in enumerate(children):
        original = BfclEnv.fresh(entry)
        original.run_all(entry.ground_truth[0][:k])
        from_snapshot = await domain.toolbox_at(entry, child.prefix)  # taken during the episode
        replayed = await ToolUseDomain().toolbox_at(entry, child.prefix)  # nothing cached: replays the prefix
        assert from_snapshot.env.state() == replayed.env.state() == original.state(), k
        assert from_snapshot.env.run("pwd()") == replayed.env.run("pwd()") == original.run("pwd()")
        assert from_snapshot.calls == replayed.calls == [list(entry.ground_truth[0][:k])]


@pytest.mark.anyio
async def test_one_action_per_turn_runs_only_the_last_call(entry: Entry) -> None:
    two = ('<tool>{"name": "mkdir", "arguments": {"dir_name": "a"}}</tool> then '
           '<tool>{"name": "cd", "arguments": {"folder": "document"}}</tool>')
    policy = ScriptedPolicy([two, "<TASK_FINISHED>"], max_context=BIG)
    async with ToolUseEvaluator() as evaluator:
        rolled = await ToolUseDomain().roll_out(Start(task_of(entry), StepKind.BASE), policy, evaluator, group_size=1,
                                                params=PARAMS, settings=settings())
    history = rolled.histories[0]
    assert "one action per turn" in history[1].content and history[2].content.startswith('{"current_working')
    assert rolled.rollouts[0].episode.metrics["tool_error_extra_call"] == 1


@pytest.mark.anyio
async def test_hostile_calls_come_back_as_errors(entry: Entry) -> None:
    script = ['<tool>{"name": "__import__", "arguments": {"name": "os"}}</tool>',
              '<tool>{"name": "cd", "arguments": {"folder=__import__(\'os\').getcwd(), x": 1}}</tool>',
              '<tool>{"name": "cd", "arguments": {"nope": 1}}</tool>', "<TASK_ERROR>"]
    async with ToolUseEvaluator() as evaluator:
        rolled = await ToolUseDomain().roll_out(Start(task_of(entry), StepKind.BASE),
                                                ScriptedPolicy(script, max_context=BIG), evaluator, group_size=1,
                                                params=PARAMS, settings=settings())
    results = [m.content for m in rolled.histories[0] if m.role == "tool"]
    assert all(r.startswith("Error during execution: ") for r in results) and len(results) == 3
    metrics = rolled.rollouts[0].episode.metrics
    assert metrics["tool_error_unknown_function"] == metrics["tool_error_unsafe_call"] == 1
    assert metrics["tool_error_bad_arguments"] == 1 and rolled.rollouts[0].reward == 0.0


@pytest.mark.anyio
async def test_evaluation_runs_every_request_and_reports_first_request_and_total_return(entry: Entry) -> None:
    policy = ScriptedPolicy(ground_truth_player(entry), max_context=BIG)
    async with ToolUseEvaluator() as evaluator:
        result = await ToolUseDomain().evaluate_task(policy, evaluator, task_of(entry), steps=1, samples=2,
                                                     params=PARAMS, settings=settings(), tick=lambda _: None)
    assert [[s.score for s in t] for t in result.trajectories] == [[1.0, 1.0], [1.0, 1.0]]
    assert result.metrics["first_request_accuracy"] == 1.0 and result.metrics["total_return"] == 4.0
    record = json.loads(result.trajectories[0][0].text)
    assert [len(c) for c in record["calls"]] == [len(c) for c in entry.ground_truth]
    turns = sum(len(calls) + 1 for calls in entry.ground_truth)  # each request: its calls, then <TASK_FINISHED>
    revisions = [call for call in policy.calls if is_iteration(call[-1])]
    assert len(revisions) == 2 * turns  # K = 1: every turn of the k = 1 episode revised once, per trajectory

    failing = ScriptedPolicy(ground_truth_player(entry, wrong_at=(1, 0)), max_context=BIG)
    async with ToolUseEvaluator() as evaluator:
        result = await ToolUseDomain().evaluate_task(failing, evaluator, task_of(entry), steps=0, samples=1,
                                                     params=PARAMS, settings=settings(), tick=lambda _: None)
    first = result.trajectories[0][0]  # the first request passed (the headline), a later one did not
    assert first.score == 1.0 and first.secondary == {"all_requests_accuracy": 0.0}
    assert result.metrics["first_request_accuracy"] == 1.0 and 0 < result.metrics["total_return"] < 4


@pytest.mark.anyio
async def test_miss_func_reveals_withheld_functions_at_their_request() -> None:
    entry = get_entry("multi_turn_miss_func_0")
    [(_, [name])] = entry.missed.items()
    policy = ScriptedPolicy(ground_truth_player(entry), max_context=BIG)
    assert f'"name": "{name}"' not in system_prompt(entry)
    async with ToolUseEvaluator() as evaluator:
        result = await ToolUseDomain().evaluate_task(policy, evaluator, task_of(entry), steps=0, samples=1,
                                                     params=PARAMS, settings=settings(), tick=lambda _: None)
    reveal = [m for m in policy.calls[-1] if m.role == "user" and REVEAL in m.content]
    assert len(reveal) == 1 and f'"name": "{name}"' in reveal[0].content
    assert result.trajectories[0][0].score == 1.0 and result.metrics["total_return"] == len(entry.requests)


@pytest.mark.anyio
async def test_evaluation_budget_caps_turns_over_all_requests(entry: Entry) -> None:
    policy = ScriptedPolicy(ground_truth_player(entry), max_context=BIG)
    async with ToolUseEvaluator() as evaluator:
        result = await ToolUseDomain().evaluate_task(policy, evaluator, task_of(entry), steps=0, samples=1,
                                                     params=PARAMS, settings=settings(max_turns=5),
                                                     tick=lambda _: None)
    record = json.loads(result.trajectories[0][0].text)
    assert len(record["calls"]) == 2  # 4 turns, then 1 of request 2
    assert result.trajectories[0][0].score == 1.0 and result.trajectories[0][0].secondary["all_requests_accuracy"] == 0
    assert result.metrics["first_request_accuracy"] == 1.0


@pytest.mark.anyio
async def test_a_message_that_is_no_action_is_told_so_and_costs_a_turn(entry: Entry) -> None:
    chatty = ScriptedPolicy(lambda _: "Sure, I can help with that.", max_context=BIG)
    async with ToolUseEvaluator() as evaluator:
        rolled = await ToolUseDomain().roll_out(Start(task_of(entry), StepKind.BASE), chatty, evaluator, group_size=1,
                                                params=PARAMS, settings=settings(max_turns=3))
        history = rolled.histories[0]
        assert [m.role for m in history] == ["assistant", "tool"] * 3 and history[1].name == "no_action"
        assert rolled.rollouts[0].episode.metrics["tool_error_no_action"] == 3

        result = await ToolUseDomain().evaluate_task(chatty, evaluator, task_of(entry), steps=0, samples=1,
                                                     params=PARAMS, settings=settings(), tick=lambda _: None)
    record = json.loads(result.trajectories[0][0].text)
    assert record["calls"] == [[], [], [], []] and len(record["actions"]) == 40  # 10 turns a request, then the next


@pytest.mark.anyio
async def test_the_report_leads_with_first_request_accuracy_and_keeps_all_requests(tmp_path: Path) -> None:
    entries = [get_entry("multi_turn_base_0"), get_entry("multi_turn_base_1")]
    players = {entries[0].id: ground_truth_player(entries[0], wrong_at=(1, 0)),  # request 2 goes wrong
               entries[1].id: ground_truth_player(entries[1])}

    def play(messages: Sequence[Message]) -> str:
        [entry] = [e for e in entries if request_text(e.requests[0]) in messages[1].content]
        return players[entry.id](messages)

    async with ToolUseEvaluator() as evaluator:
        result = await evaluate(ScriptedPolicy(play, max_context=BIG), evaluator, [task_of(e) for e in entries],
                                steps=1, samples=2, params=PARAMS, domain=ToolUseDomain(), settings=settings())
    assert result.score == "first_request_accuracy" and result.accuracy_by_step == (1.0, 1.0)
    assert result.intervals is not None and result.intervals["accuracy_by_step"][0]["low"] == 1.0
    all_requests = result.secondary["all_requests_accuracy"]
    assert all_requests["accuracy_by_step"] == (0.5, 0.5) and all_requests["delta_k"] == 0.0
    assert all_requests["intervals"]["accuracy_by_step"][0] == {"estimate": 0.5, "low": 0.0, "high": 1.0}

    cfg = EvalConfig(out=tmp_path / "tools.json", domain="tool_use", steps=1, samples=2)
    write_report(cfg, result)
    body = json.loads(cfg.out.read_text())
    assert body["score"] == "first_request_accuracy" and body["accuracy_by_step"] == [1.0, 1.0]
    assert body["secondary"]["all_requests_accuracy"]["accuracy_by_step"] == [0.5, 0.5]
    assert cfg.out.with_suffix(".png").stat().st_size > 0
    line = summary_line(result)
    assert line.startswith("avg@2 first-request accuracy at k=0 100.0 [100.0, 100.0], at k=1 100.0")
    assert "; all-requests accuracy at k=0 50.0 [0.0, 100.0], at k=1 50.0 [0.0, 100.0], Delta_1 +0.0" in line


async def evaluated(entry: Entry, policy: ScriptedPolicy, steps: int) -> TaskResult:
    async with ToolUseEvaluator() as evaluator:
        return await ToolUseDomain().evaluate_task(policy, evaluator, task_of(entry), steps=steps, samples=1,
                                                   params=PARAMS, settings=settings(), tick=lambda _: None)


def wrong_until_revised(entry: Entry):
    """Every plain action is a wrong call; every improve step answers with the ground truth."""
    truth = ground_truth_player(entry)
    return lambda messages: truth(messages) if is_iteration(messages[-1]) else \
        '<tool>{"name": "mkdir", "arguments": {"dir_name": "wrong"}}</tool>'


@pytest.mark.anyio
async def test_k_revisions_per_turn_before_the_episode_moves_on(entry: Entry) -> None:
    policy = ScriptedPolicy(wrong_until_revised(entry), max_context=BIG)
    result = await evaluated(entry, policy, steps=2)
    [trajectory] = result.trajectories  # k = 0: the plain episode; k >= 1: every action revised k times
    assert [s.score for s in trajectory] == [0.0, 1.0, 1.0]
    assert [s.secondary["all_requests_accuracy"] for s in trajectory] == [0.0, 1.0, 1.0]
    assert [len(c) for c in json.loads(trajectory[2].text)["calls"]] == [len(c) for c in entry.ground_truth]
    assert result.metrics["first_request_accuracy"] == 0.0 and result.metrics["first_request_accuracy_final"] == 1.0
    # The first action's chain (2 steps) is shared; after it, depth k revises each later turn k times.
    turns = sum(len(calls) + 1 for calls in entry.ground_truth)
    revisions = [call for call in policy.calls if is_iteration(call[-1])]
    assert len(revisions) == 2 + (1 + 2) * (turns - 1)
    first_turn = [call for call in revisions if len(call) == 2]  # the template alone: the request appears once
    assert len(first_turn) == 2 and first_turn[0][1].content.count(task_of(entry).prompt) == 1
    assert "mkdir" in first_turn[0][1].content  # then the latest iterate: the first revision's call
    assert json_call(entry, entry.ground_truth[0][0]) in first_turn[1][1].content
    for call in revisions:  # earlier turns as ordinary history, the latest iterate only, no feedback
        assert not any(is_iteration(m) for m in call[1:-1]) and call[-1].content.count("## Current response:") == 1
    # unchanged: the second step of the shared chain and of each later turn at depth 2
    assert result.metrics["revisions_changed"] == pytest.approx(1 - turns / len(revisions))
    assert result.metrics["revisions_without_room"] == 0.0


@pytest.mark.anyio
async def test_a_revision_without_room_keeps_the_action(entry: Entry) -> None:
    policy = ScriptedPolicy(wrong_until_revised(entry), max_context=BIG)
    head = (Message("system", system_prompt(entry)), Message("user", task_of(entry).prompt))
    policy.max_context = sum(policy.estimate_tokens(m.content) for m in head) + 120  # the improve prompt is longer
    result = await evaluated(entry, policy, steps=2)
    assert [s.score for s in result.trajectories[0]] == [0.0, 0.0, 0.0]
    assert not any(is_iteration(call[-1]) for call in policy.calls)
    assert result.metrics["revisions_without_room"] == 1.0
