"""The main job's report says which machine and precision it ran on and where its time went."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exitagent import run, run_config, run_eval
from exitagent.report import write_report


def result(accuracy: list[float], elapsed_s: float) -> dict[str, object]:
    return {"accuracy_by_step": accuracy, "delta_k": accuracy[-1] - accuracy[0], "net_corrections": 0,
            "elapsed_s": elapsed_s, "config": {"samples": 1}}


def test_the_report_records_machine_precision_and_time(tmp_path: Path) -> None:
    (tmp_path / run.TRAIN_CLOCK).write_text(json.dumps({"seconds": 1080.0}))
    machine = "cpu x86_64 AVX2 (no native bf16), AMD EPYC; precision float32 (CPU has no native bf16)"
    report = write_report(tmp_path, result([0.32, 0.3], 180.0), result([0.49, 0.5], 150.0), machine=machine,
                          wall_s=1500.0)
    text = report.read_text()
    assert f"Machine: {machine}." in text
    assert ("Time: 25.0 min in this invocation: base evaluation 3.0 min, training 18.0 min, trained evaluation "
            "2.5 min.") in text


def test_evaluation_concurrency_is_a_run_flag_and_not_part_of_what_is_measured(tmp_path: Path) -> None:
    default = run.parse_config(["--run-dir", str(tmp_path)])
    wider = run.parse_config(["--run-dir", str(tmp_path), "--eval-concurrency", "8"])
    assert default.eval_concurrency == run_config.EVAL_CONCURRENCY and wider.eval_concurrency == 8
    assert run_eval.evaluation_key(default, "base") == run_eval.evaluation_key(wider, "base")
    forced = run.parse_config(["--run-dir", str(tmp_path), "--precision", "float32"])
    assert run_eval.evaluation_key(forced, "base") != run_eval.evaluation_key(default, "base")  # precision moves scores


def test_a_bad_evaluation_concurrency_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        run.parse_config(["--run-dir", str(tmp_path), "--eval-concurrency", "0"])
    assert exited.value.code == 2
    assert "--eval-concurrency must be at least 1" in capsys.readouterr().err


class PolicyOnly:
    """The one thing ``run.progress`` asks of the server: its ``/policy`` answer."""

    def __init__(self, **policy: object) -> None:
        self.answer = {"version": "step-000003", "rejected": 0, "last_error": "", **policy}

    def policy(self, timeout_s: float = 10.0) -> dict[str, object]:
        self.timeout_s = timeout_s
        return self.answer


def test_the_progress_line_says_when_the_server_refuses_checkpoints(tmp_path: Path) -> None:
    assert run.progress(tmp_path, [PolicyOnly()]).endswith("served step-000003")  # type: ignore[arg-type]
    line = run.progress(tmp_path, [PolicyOnly(rejected=2, last_error="canary mismatch: 0.2 > 0.1")])  # type: ignore[arg-type]
    assert "2 checkpoints refused, last: canary mismatch: 0.2 > 0.1" in line
    # several servers (run --servers): one version each, they reload seconds apart
    two = run.progress(tmp_path, [PolicyOnly(), PolicyOnly(version="step-000002")])  # type: ignore[list-item]
    assert two.endswith("served step-000003 / step-000002")
    # near the end of the budget the question waits no longer than what is left (run.train)
    hurried = PolicyOnly()
    run.progress(tmp_path, [hurried], timeout_s=0.4)  # type: ignore[list-item]
    assert hurried.timeout_s == 0.4


def synthetic(seed: int, tasks: int, samples: int, steps: int, p_right: float) -> dict[str, object]:
    """An evaluation's JSON from scored TaskResults (no server): evaluate's own summarize."""
    import random

    from exitagent.evaluate import summarize
    from exitagent.trajectories import Step, TaskResult
    from exitagent.types import Task

    rng = random.Random(seed)
    results = [TaskResult(Task(f"t{t}", "math", f"q{t}", answer="1"),
                          tuple(tuple(Step("x", float(rng.random() < p_right), "base") for _ in range(steps + 1))
                                for _ in range(samples))) for t in range(tasks)]
    body = summarize(results, steps=steps, samples=samples).to_json()
    body["config"] = {"samples": samples, "temperature": 0.7}
    return body


def test_the_report_shows_every_figure_with_its_interval_and_the_greedy_column(tmp_path: Path) -> None:
    base, trained = synthetic(0, 40, 4, 3, 0.3), synthetic(1, 40, 4, 3, 0.5)
    trained["greedy"] = synthetic(2, 40, 1, 3, 0.5)
    note = "Full size:\n\n```\npython -m exitagent.evaluate\n```"
    text = write_report(tmp_path, base, trained, full_size=note).read_text()
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith(("| base |", "| trained |"))}
    assert rows["| base"].count("[") == 4 and rows["| base"].endswith("| – | – |")  # no greedy pass for base
    assert rows["| trained"].count("[") == 6  # k=0, k=K, Delta_K, net corrections, greedy k=0, greedy Delta_K
    first = trained["intervals"]["accuracy_by_step"][0]  # type: ignore[index]
    assert f"{100 * first['estimate']:.1f} [{100 * first['low']:.1f}, {100 * first['high']:.1f}]" in rows["| trained"]
    assert "| k | base (%) | trained (%) |" in text and "| 3 | " in text  # the curve to K, step by step
    assert "Held-out arithmetic: 40 tasks, avg@4 sampled at temperature 0.7, K = 3" in text
    assert "paired percentile bootstrap over tasks" in text and "Depths trained on: no groups" in text
    assert "python -m exitagent.evaluate" in text
    assert (tmp_path / "report" / "accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_a_small_run_evaluation_prints_the_full_size_commands(tmp_path: Path) -> None:
    cfg = run.parse_config(["--run-dir", str(tmp_path), "--precision", "float32"])
    note = run_eval.full_size_note(cfg, tmp_path / "weights" / "step-000040")
    assert "smaller than the paper's protocol" in note
    assert f"--model {tmp_path / 'weights' / 'step-000040'} --dtype float32" in note
    assert note.count(f"--n-tasks {run_eval.FULL_SIZE_TASKS}") == 2  # base and trained, the same flags
    full = run.parse_config(["--run-dir", str(tmp_path), "--eval-samples", "8", "--eval-steps", "16",
                             "--eval-temperature", "0.7", "--eval-tasks", str(run_eval.FULL_SIZE_TASKS)])
    assert run_eval.full_size_note(full, None) == ""


def test_the_report_shows_the_second_held_out_set_when_it_was_measured(tmp_path: Path) -> None:
    base, trained = synthetic(0, 40, 4, 3, 0.3), synthetic(1, 40, 4, 3, 0.5)
    plain = write_report(tmp_path, base, trained).read_text()
    assert "Second held-out set" not in plain
    words = (synthetic(2, 30, 4, 3, 0.2), synthetic(3, 30, 4, 3, 0.4))
    text = write_report(tmp_path, base, trained, word_problems=words).read_text()
    section = text.split("Second held-out set", 1)[1].split("\n\n", 2)[1]
    assert section.count("| base |") == 1 and section.count("| trained |") == 1 and section.count("[") >= 8


def test_the_report_names_what_another_domain_measured(tmp_path: Path) -> None:
    """Tool use's headline is first-request accuracy on BFCL; an environment's held-out set is its own tasks."""
    def tool_use(accuracy: list[float]) -> dict[str, object]:
        return {**result(accuracy, 60.0), "score": "first_request_accuracy",
                "config": {"samples": 1, "domain": "tool_use", "source": "bfcl"}}

    text = write_report(tmp_path, tool_use([0.2, 0.2]), tool_use([0.3, 0.3])).read_text()
    assert "| policy | first request accuracy at k=0 (%) |" in text and "Held-out bfcl:" in text
    assert "First request accuracy at k=0 changed by +10.0 points" in text
    mine = {**result([0.5, 0.5], 60.0), "config": {"samples": 1, "domain": "my_shop:ENV", "source": ""}}
    assert "Held-out my_shop:ENV:" in write_report(tmp_path, mine, mine).read_text()
