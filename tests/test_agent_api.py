"""The embedding API with an injected ScriptedPolicy: iterates, scores, ``best``, modes and the sync wrapper."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence

import pytest
import structlog

from exitagent import Improvement, SelfImprovingAgent
from exitagent.errors import ConfigError, EvaluatorError
from exitagent.policy import SamplingParams, ScriptedPolicy
from exitagent.prompts import DIVERGE_INSTRUCTION, DIVERGE_STEPS, step_messages
from exitagent.types import Message, Score, StepKind

REQUEST = "What is 2 + 2? Put your final answer in \\boxed{}."
CURRENT = re.compile(r"## Current response:\n(.*)\Z", re.DOTALL)
# y^0 .. y^3: wrong, right, wrong, right
CHAIN = {None: "\\boxed{5}", "\\boxed{5}": "I think \\boxed{4}", "I think \\boxed{4}": "\\boxed{3}",
         "\\boxed{3}": "so \\boxed{4}"}


@pytest.fixture(autouse=True)
def default_logging() -> Iterator[None]:
    """An entry point's ``configure`` (here, or in an earlier test module) binds structlog to the
    stderr pytest captured for that test and closes afterwards: log to the defaults in between."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


def follow(messages: Sequence[Message]) -> str:
    match = CURRENT.search(messages[-1].content.removesuffix(f"\n\n{DIVERGE_STEPS}"))  # None: a first attempt
    return CHAIN[match.group(1) if match else None]


def correct(text: str) -> float:
    return float("{4}" in text)


def agent(**kw: object) -> tuple[SelfImprovingAgent, ScriptedPolicy]:
    policy = ScriptedPolicy(follow, **kw)  # type: ignore[arg-type]
    return SelfImprovingAgent(policy=policy, params=SamplingParams(max_tokens=64)), policy


@pytest.mark.anyio
async def test_improve_returns_every_iterate_scored_and_the_earliest_best() -> None:
    subject, policy = agent()
    result = await subject.improve(REQUEST, steps=3, evaluator=correct)
    assert [it.step for it in result.iterates] == [0, 1, 2, 3]
    assert [it.text for it in result.iterates] == list(CHAIN.values())
    assert [it.score for it in result.iterates] == [0.0, 1.0, 0.0, 1.0]
    assert result.best is result.iterates[1]  # ties go to the earliest
    assert result.final.text == "so \\boxed{4}" and not result.stopped_early and result.scored
    # each step sees the request and the latest iterate only: the training prompt
    assert policy.calls[0] == [Message("user", REQUEST)]
    for call, previous in zip(policy.calls[1:], result.iterates[:-1], strict=True):
        assert tuple(call) == step_messages(StepKind.IMPROVE, REQUEST, (), previous.text)


@pytest.mark.anyio
async def test_async_evaluators_scores_and_failures() -> None:
    async def graded(text: str) -> Score:
        if text.startswith("I think"):
            raise EvaluatorError("checker crashed")
        return Score(correct(text))

    result = await agent()[0].improve(REQUEST, steps=3, evaluator=graded)
    assert [it.score for it in result.iterates] == [0.0, None, 0.0, 1.0]
    assert result.iterates[1].failure == "checker crashed"
    assert result.best is result.iterates[3]  # the unscored right answer is not a candidate, nor a 0


@pytest.mark.anyio
async def test_sync_evaluators_run_off_the_event_loop_and_bad_values_raise() -> None:
    loop_thread, seen = threading.get_ident(), set[int]()

    def scorer(text: str) -> bool:
        seen.add(threading.get_ident())
        return "{4}" in text

    assert [it.score for it in (await agent()[0].improve(REQUEST, steps=1, evaluator=scorer)).iterates] == [0.0, 1.0]
    assert loop_thread not in seen
    with pytest.raises(TypeError, match="finite number"):
        await agent()[0].improve(REQUEST, steps=0, evaluator=lambda text: "high")  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError, match="finite number"):
        await agent()[0].improve(REQUEST, steps=0, evaluator=lambda text: float("nan"))


@pytest.mark.anyio
async def test_without_an_evaluator_nothing_is_scored() -> None:
    result = await agent()[0].improve(REQUEST, steps=2)
    assert result.best is None and not result.scored
    assert [it.score for it in result.iterates] == [None, None, None]


@pytest.mark.anyio
async def test_diverge_mode_uses_the_divergence_prompt() -> None:
    subject, policy = agent()
    result = await subject.improve(REQUEST, steps=1, mode="diverge")
    assert policy.calls[1][-1].content.startswith(DIVERGE_INSTRUCTION)
    assert tuple(policy.calls[1]) == step_messages(StepKind.DIVERGE, REQUEST, (), result.iterates[0].text)


@pytest.mark.anyio
async def test_stops_early_when_the_next_prompt_would_not_fit() -> None:
    subject, policy = agent(max_context=120)  # one token per character: the request fits, an improve step not
    result = await subject.improve(REQUEST, steps=3)
    assert len(result.iterates) == 1 and result.stopped_early and len(policy.calls) == 1


def test_improve_sync_with_an_injected_policy() -> None:
    result = agent()[0].improve_sync(REQUEST, steps=2, evaluator=correct)
    assert isinstance(result, Improvement)
    assert [it.score for it in result.iterates] == [0.0, 1.0, 0.0]


@pytest.mark.anyio
async def test_bad_arguments_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        SelfImprovingAgent()
    with pytest.raises(ConfigError):
        SelfImprovingAgent("http://127.0.0.1:9/v1", policy=ScriptedPolicy(follow))
    with pytest.raises(ConfigError, match="mode"):
        await agent()[0].improve(REQUEST, mode="sideways")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="steps"):
        await agent()[0].improve(REQUEST, steps=-1)


def test_import_exitagent_stays_light() -> None:
    code = ("import sys, exitagent; assert 'openai' not in sys.modules and 'exitagent.agent' not in sys.modules; "
            "from exitagent import SelfImprovingAgent; assert 'exitagent.agent' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
