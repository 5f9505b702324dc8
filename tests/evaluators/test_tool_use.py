"""The tool-use checker's rules on small cases: multiset responses, irrelevance, cumulative state."""

from __future__ import annotations

import pytest

from evaluators.tool_use import CallRecord, ToolUseEvaluator, check, missing_results
from evaluators.worlds.bfcl.env import get_entry
from exitagent.domains.tool_use import task_of
from exitagent.errors import EvaluatorError


def test_missing_results_is_an_unordered_multiset_match() -> None:
    assert missing_results(["a", "b"], ["b", "x", "a"]) == []
    assert missing_results(["a", "a"], ["a", "b"]) == ["a"]  # each seen result matches once


def test_irrelevance_requests_pass_only_without_calls() -> None:
    entry = get_entry("multi_turn_base_180")  # requests 3 and 4 cannot be done
    truth = [list(c) for c in entry.ground_truth]
    assert all(v.passed for v in check(entry, truth))
    truth[3] = ["get_flight_cost(travel_from='SFO', travel_to='LAX', travel_date='2024-11-15', travel_class='economy')"]
    verdicts = check(entry, truth)
    assert not verdicts[3].passed and verdicts[3].reason == "irrelevance_call"


def test_a_request_without_calls_fails_and_state_is_cumulative() -> None:
    entry = get_entry("multi_turn_base_0")
    truth = [list(c) for c in entry.ground_truth]
    verdicts = check(entry, [[], *truth[1:]])
    assert verdicts[0].reason == "no_call" and not verdicts[1].passed  # request 0's calls never ran
    late = check(entry, [truth[0][:2], [truth[0][2], *truth[1]]])  # mv done one request late
    assert late[0].reason == "state_mismatch" and late[1].passed


@pytest.mark.anyio
async def test_the_evaluator_scores_records_and_fails_loudly_on_garbage() -> None:
    entry = get_entry("multi_turn_base_0")
    task = task_of(entry)
    async with ToolUseEvaluator() as evaluator:
        full = await evaluator.score(task, CallRecord(entry.id, entry.ground_truth).to_json())
        first = await evaluator.score(task, CallRecord(entry.id, entry.ground_truth[:1]).to_json())
        with pytest.raises(EvaluatorError):
            await evaluator.score(task, "not json")
        with pytest.raises(EvaluatorError):
            await evaluator.score(task, CallRecord("multi_turn_base_999", ((),)).to_json())
    assert full.total == 1.0 and full.components["passed"] == 4 and full.components["first_request"] == 1.0
    assert first.total == 1.0 and first.components["requests"] == 1
