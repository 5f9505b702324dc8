"""The MLE domain: reward rules on hand-made score sequences, the prompt, collect groups and their
buffer children, task loading, and the greedy scaffold driven by a scripted policy (known programs)
with real sandboxed grading."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from evaluators.mle import MLEEvaluator, extract_program
from evaluators.worlds.mle import Competition
from evaluators.worlds.mle.references import baseline_program, strong_program
from evaluators.worlds.mle.search import greedy_search, next_step
from exitagent.curriculum import CurriculumConfig, Start, entry_key, plan_update
from exitagent.domains import DomainSettings, TaskSpec, get_domain
from exitagent.domains.mle import MLEDomain, step_reward, task_for
from exitagent.domains.mle_prompts import TEMPLATE_PROGRAM, TRACE_MARK, decode_iterate, encode_iterate
from exitagent.errors import ConfigError, EvaluatorError
from exitagent.evaluate import evaluate
from exitagent.policy import SamplingParams, ScriptedPolicy
from exitagent.types import BufferEntry, Group, Message, PolicyVersion, Sample, Score, StepKind, Task, Variant
from tests.sandboxing import needs_bwrap

SETTINGS = DomainSettings(eval_timeout_s=30.0, memory_mb=1024, max_context=200_000)
PARAMS = SamplingParams(max_tokens=20_000)
CRASH = 'import os\nimport pandas as pd\ntrain = pd.read_csv(os.path.join(os.environ["DATA_DIR"], "train.csv"))\n' \
        'print(train["no_such_column"])\n'


def _fenced(program: str) -> str:
    return f"I will fit a model.\n```python\n{program}```\n"


def _entry(task: Task, iterate: str, reward: float, errored: bool = False) -> BufferEntry:
    return BufferEntry(id=7, key=entry_key(task.id, (), iterate), task_id=task.id, prefix=(), iterate=iterate,
                       depth=0, start_turn=0, parent_id=None, version=PolicyVersion(0, "base"), score=0.2,
                       reward=reward, prev_reward=None, errored=errored, step_kind=StepKind.BASE)


# --- rewards --------------------------------------------------------------------------------------


def test_reward_rules_on_hand_made_sequences() -> None:
    # a chain of improve steps: each earns the share of the remaining gap it closed, never below 0
    scores = [0.0, 0.2, 0.5, 0.5, 0.4, 0.9, 1.0]
    rewards = [step_reward(StepKind.IMPROVE, r, prev) for prev, r in itertools.pairwise(scores)]
    assert rewards == pytest.approx([0.2, 0.375, 0.0, 0.0, 0.8333333, 1.0])
    # debug steps use the same rule; a crashed start scored 0, so the reward is the new score
    assert step_reward(StepKind.DEBUG, 0.6, 0.0) == pytest.approx(0.6)
    assert step_reward(StepKind.DEBUG, 0.6, None) == pytest.approx(0.6)
    # divergence, base and replay steps earn the plain normalised score, whatever came before
    assert [step_reward(k, 0.3, 0.8) for k in (StepKind.DIVERGE, StepKind.BASE, StepKind.REPLAY)] == [0.3] * 3
    # a start already at the top has no gap: keeping the top score is what pays
    assert step_reward(StepKind.IMPROVE, 1.0, 1.0) == 1.0 and step_reward(StepKind.IMPROVE, 0.4, 1.0) == 0.4


def test_iterates_carry_the_trace_after_the_code() -> None:
    program = "import os\nprint(1)\n"
    assert encode_iterate(program) == program and decode_iterate(program) == (program, "")
    text = encode_iterate(program, "Traceback ...\nKeyError: 'x'\n")
    assert text.startswith(program.rstrip()) and TRACE_MARK in text
    assert decode_iterate(text) == (program, "Traceback ...\nKeyError: 'x'")


# --- prompts ---------------------------------------------------------------------------------------


def test_prompt_sections(iris: Competition) -> None:
    domain, task = MLEDomain(), task_for(iris)
    policy = ScriptedPolicy([], max_context=200_000)
    base = domain.start_messages(Start(task, StepKind.BASE), SETTINGS, policy)
    assert base is not None and len(base) == 1 and base[0].role == "user"
    text = base[0].content
    order = [text.index(s) for s in ("Goal: Improve", "# Current solution.py", "# Task description",
                                     "# Data", "### train.csv: 105 rows", "### sample_submission.csv", "# Rules")]
    assert order == sorted(order)
    assert TEMPLATE_PROGRAM.strip() in text and "DATA_DIR" in text and "one ```python fenced code block" in text
    assert "30 seconds and 1024 MiB" in text and "Error output" not in text

    crashed = encode_iterate(CRASH, "The program exited with code 1.\nKeyError: 'no_such_column'")
    debug = domain.start_messages(Start(task, StepKind.DEBUG, _entry(task, crashed, 0.0, True)), SETTINGS, policy)
    assert debug is not None
    text = debug[0].content
    assert "crashed" in text and "no_such_column" in text
    assert text.index(CRASH.strip()) < text.index("# Error output") < text.index("# Task description")

    diverge = domain.start_messages(Start(task, StepKind.DIVERGE, _entry(task, CRASH, 0.3)), SETTINGS, policy)
    assert diverge is not None and "RADICALLY DIFFERENT" in diverge[0].content

    # a small context drops preview rows first, then gives up (None)
    small = ScriptedPolicy([], max_context=len(diverge[0].content) + 40 + 15)  # one token short
    shorter = domain.start_messages(Start(task, StepKind.DIVERGE, _entry(task, CRASH, 0.3)), SETTINGS, small)
    assert shorter is not None and len(shorter[0].content) < len(diverge[0].content)
    assert domain.start_messages(Start(task, StepKind.BASE), SETTINGS, ScriptedPolicy([], max_context=300)) is None


# --- tasks -----------------------------------------------------------------------------------------


def test_load_tasks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, iris: Competition) -> None:
    monkeypatch.setenv("EXITAGENT_HOME", str(tmp_path / "home"))
    domain = get_domain("mle")
    heldout = domain.load_tasks(TaskSpec("offline", "heldout"))
    assert [t.id for t in heldout] == ["breast-cancer-diagnosis", "friedman-regression"]
    assert (tmp_path / "home" / "competitions" / "friedman-regression" / "private" / "answers.csv").is_file()
    picked = domain.load_tasks(TaskSpec("offline", "all", levels=("wine-cultivar", "iris-species")))
    assert sorted(t.id for t in picked) == ["iris-species", "wine-cultivar"]
    assert all(t.domain == "mle" and Path(t.metadata["competition_dir"]).is_dir() for t in picked)
    assert len(domain.load_tasks(TaskSpec("offline", "train", n=2))) == 2
    # a directory of prepared competitions, or one competition
    assert [t.id for t in domain.load_tasks(TaskSpec(str(iris.root.parent), "all"))] == ["iris-species"]
    assert [t.id for t in domain.load_tasks(TaskSpec(str(iris.root), "all"))] == ["iris-species"]
    with pytest.raises(ConfigError, match="titanic"):
        domain.load_tasks(TaskSpec("offline", "all", levels=("titanic",)))
    with pytest.raises(ConfigError, match="directory of prepared competitions"):
        domain.load_tasks(TaskSpec("gsm8k", "train"))


# --- collect groups -------------------------------------------------------------------------------


@needs_bwrap
@pytest.mark.anyio
async def test_base_group_rewards_and_children(iris: Competition) -> None:
    domain, task = MLEDomain(), task_for(iris)
    responses = [_fenced(strong_program(iris.id)), _fenced(CRASH), "A random forest would do well here."]
    policy = ScriptedPolicy(list(responses), max_context=200_000)
    async with domain.open_evaluator(SETTINGS) as evaluator:
        rolled = await domain.roll_out(Start(task, StepKind.BASE), policy, evaluator, group_size=3, params=PARAMS,
                                       settings=SETTINGS)
    strong, crash, unformatted = rolled.rollouts
    assert strong.score is not None and strong.score.total == pytest.approx(1.0) and strong.reward == strong.score.total
    assert crash.score is not None and crash.score.total == 0.0 and crash.score.components["errored"] == 1.0
    assert unformatted.score is not None and unformatted.score.components["format_error"] == 1.0
    assert all(len(e.sequences) == 1 for e in (r.episode for r in rolled.rollouts))  # token-faithful

    assert rolled.histories is not None
    assert rolled.histories[0] == (Message("assistant", strong_program(iris.id)),)
    assert decode_iterate(rolled.histories[1][0].content)[0] == CRASH
    assert "KeyError" in decode_iterate(rolled.histories[1][0].content)[1]
    assert rolled.histories[2] == ()  # no program: no buffer child

    config = CurriculumConfig.for_domain("mle", Variant.EXIT, group_size=3)
    group = Group("g1", task.id, StepKind.BASE, Variant.EXIT, PolicyVersion(0, "base"), 0, rolled.rollouts)
    update = plan_update(config, Start(task, StepKind.BASE), group, rolled.histories)
    assert [(c.reward, c.errored) for c in update.children] == [(pytest.approx(1.0), False), (0.0, True)]


@needs_bwrap
@pytest.mark.anyio
async def test_improve_and_debug_groups_shape_rewards(iris: Competition) -> None:
    domain, task = MLEDomain(), task_for(iris)
    start = Start(task, StepKind.IMPROVE, _entry(task, baseline_program(iris.id), reward=0.5))
    policy = ScriptedPolicy([_fenced(strong_program(iris.id)), _fenced(baseline_program(iris.id))],
                            max_context=200_000)
    async with domain.open_evaluator(SETTINGS) as evaluator:
        improved = await domain.roll_out(start, policy, evaluator, group_size=2, params=PARAMS, settings=SETTINGS)
        crashed = encode_iterate(CRASH, "The program exited with code 1.\nKeyError: 'no_such_column'")
        debug_start = Start(task, StepKind.DEBUG, _entry(task, crashed, reward=0.0, errored=True))
        debug_policy = ScriptedPolicy([_fenced(baseline_program(iris.id))], max_context=200_000)
        debugged = await domain.roll_out(debug_start, debug_policy, evaluator, group_size=1, params=PARAMS,
                                         settings=SETTINGS)
    strong, weak = improved.rollouts
    assert strong.reward == pytest.approx(1.0) and strong.score is not None and strong.score.total == pytest.approx(1)
    assert weak.reward == 0.0 and weak.score is not None and weak.score.total == pytest.approx(0.0)
    assert "no_such_column" in debug_policy.calls[0][0].content  # the trace reached the debug prompt
    assert debugged.rollouts[0].reward == pytest.approx(0.0)


# --- the greedy scaffold ---------------------------------------------------------------------------


def _script(programs: Sequence[str], seen: list[str]):
    """Answer the k-th call with the k-th program, recording each prompt."""
    queue = list(programs)

    def answer(messages: Sequence[Message]) -> str:
        seen.append(messages[-1].content)
        program = queue.pop(0)
        return _fenced(program) if program else "no code, sorry"

    return answer


@needs_bwrap
@pytest.mark.anyio
async def test_greedy_scaffold_keeps_the_best_and_debugs_after_a_crash(iris: Competition) -> None:
    weak, strong = baseline_program(iris.id), strong_program(iris.id)
    worse = strong.replace('features = [c for c in train.columns if c not in ("id", target)]',
                           'features = ["sepal_width_cm"]')
    assert worse != strong
    seen: list[str] = []
    policy = ScriptedPolicy(_script([CRASH, weak, strong, worse, ""], seen), max_context=200_000)
    async with MLEEvaluator(time_limit_s=30) as evaluator:
        result = await evaluate(policy, evaluator, [task_for(iris)], steps=4, samples=1, params=PARAMS,
                                domain=MLEDomain(), settings=SETTINGS)
    # attempt 0 crashed -> attempt 1 is a debug step that shows the crash under the code
    assert "Goal: Improve" in seen[0] and TEMPLATE_PROGRAM.strip() in seen[0]
    assert "Goal: The current solution.py below crashed" in seen[1] and "no_such_column" in seen[1]
    # then improve the best program so far: the weak one, then the strong one (not the worse attempt)
    assert "Goal: Improve" in seen[2] and weak.strip() in seen[2]
    assert strong.strip() in seen[3] and strong.strip() in seen[4] and worse.strip() not in seen[4]

    task = result.tasks[0]
    attempts = [task.metrics[f"attempt_score_step_{k:02d}"] for k in range(5)]
    assert attempts[0] == 0.0 and attempts[1] == pytest.approx(0.0) and attempts[2] == pytest.approx(1.0)
    assert 0.0 < attempts[3] < 1.0 and attempts[4] == 0.0  # a worse model, then a format failure
    assert result.accuracy_by_step == pytest.approx((0.0, 0.0, 1.0, 1.0, 1.0))  # best so far
    assert result.domain_metrics["crash_rate"] == pytest.approx(0.2)
    assert result.domain_metrics["format_failure_rate"] == pytest.approx(0.2)
    assert result.domain_metrics["debug_step_rate"] == pytest.approx(0.2)
    assert TRACE_MARK in task.trajectories[0][0].text  # the crashed iterate keeps its trace
    assert json.dumps(result.to_json())  # the evaluation JSON holds it all


@pytest.mark.anyio
async def test_search_rules_without_a_sandbox() -> None:
    """next_step: debug a crash at most three times in a row, then go back to the best program."""
    crash = Score(0.0, {"errored": 1.0}, "Traceback: boom")

    async def propose(kind: StepKind, program: str, trace: str) -> Sample | None:
        calls.append((kind, program, trace))
        return None if len(calls) == 7 else Sample(f"```python\nprogram_{len(calls)}\n```", (), (), (), "stop",
                                                   PolicyVersion(0, "base"))

    async def judge(response: str) -> Score:
        n = int(response.split("program_")[1].split()[0])
        if n == 6:
            raise EvaluatorError("grader broke")
        return Score(0.4, {"errored": 0.0}) if n == 1 else crash

    calls: list[tuple[StepKind, str, str]] = []
    result = await greedy_search(propose, judge, extract_program, steps=7, template="TEMPLATE")
    kinds = [c[0] for c in calls]
    assert kinds == [StepKind.BASE, StepKind.IMPROVE, StepKind.DEBUG, StepKind.DEBUG, StepKind.DEBUG,
                     StepKind.IMPROVE, StepKind.IMPROVE, StepKind.IMPROVE]
    assert calls[1][1] == "program_1\n" and calls[2][2] == "Traceback: boom"  # improve the best; debug shows trace
    assert calls[5][1] == "program_1\n"  # after three debug steps: back to the best program
    assert result.best is not None and result.best.step == 0
    assert result.best_by_step == (0.4,) * 8
    assert result.nodes[5].failure and result.nodes[6].context_full
    assert next_step([], "T") == (StepKind.BASE, "T", "")


@needs_bwrap
@pytest.mark.anyio
async def test_collect_records_mle_groups_and_debugs_crashed_entries(iris: Competition, tmp_path: Path) -> None:
    """collect --domain mle with a scripted policy: a crashed first attempt enters the buffer with its
    trace, and a later group started from it is a debug step whose prompt shows that trace."""
    from exitagent.collect import CollectConfig, collect
    from exitagent.curriculum.store import SQLiteStore

    prompts: list[str] = []

    def answer(messages: Sequence[Message]) -> str:
        prompts.append(messages[-1].content)
        return _fenced(baseline_program(iris.id) if "crashed" in messages[-1].content else CRASH)

    cfg = CollectConfig(run_dir=tmp_path, domain="mle", variant=Variant.IMPROVE, groups=3, group_size=2,
                        concurrency=1, min_buffer=1, p_buffer=1.0, max_tokens=20_000, max_context=200_000,
                        eval_timeout_s=30.0, progress=False)
    policy = ScriptedPolicy(answer, max_context=200_000)
    with SQLiteStore.in_run(tmp_path) as store:
        async with get_domain("mle").open_evaluator(cfg.settings()) as evaluator:
            summary = await collect(cfg, policy, evaluator, store, [task_for(iris)])
        groups, entries = store.groups(), store.entries()
    assert summary.groups == 3 and summary.failed_rollouts == 0
    assert [g.step_kind for g in groups][:2] == [StepKind.BASE, StepKind.DEBUG]
    crashed = [e for e in entries if e.errored]
    assert crashed and TRACE_MARK in crashed[0].iterate and "KeyError" in crashed[0].iterate
    debug_prompts = [p for p in prompts if "Goal: The current solution.py below crashed" in p]
    assert debug_prompts and all("no_such_column" in p for p in debug_prompts)  # the trace reached them
    fixed = [e for e in entries if not e.errored]
    assert fixed and fixed[0].step_kind is StepKind.DEBUG and fixed[0].reward == pytest.approx(0.0)
