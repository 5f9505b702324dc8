"""recipes/*.toml: each loads through every entry point's parser, and holds the paper's values.

PAPER restates shared exit-spec.md (the paper's Tables 4-6 as the project records them, sections
4-7); a recipe value that differs, or a recipe key no entry point knows, fails here.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from exitagent import config, variants
from exitagent.collect import CollectConfig
from exitagent.evaluate import EvalConfig
from exitagent.run import RunConfig
from exitagent.serve import ServeConfig
from training.config import UpdateConfig

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

# exit-spec.md: models (5), G and batch sizes (2, 5), N / B_min / p / p_div (6), learning rate, KL
# beta (math), reference refresh M and alpha, PPO epsilon (5), turn budgets and MLE time limit (4),
# inference-time K and avg@n (7).
PAPER: dict[str, dict[str, dict[str, Any]]] = {
    "math-llama3b.toml": {
        "serve": {"model": "meta-llama/Llama-3.2-3B-Instruct"},
        "update": {"model": "meta-llama/Llama-3.2-3B-Instruct", "groups_per_step": 128, "lr": 1e-6, "beta": 0.001,
                   "ref_every": 100, "ref_alpha": 1.0, "epsilon": 0.2},
        "collect": {"domain": "math", "group_size": 8, "capacity": 512, "min_buffer": 128, "p_buffer": 0.5,
                    "p_diverge": 0.2},
        "evaluate": {"domain": "math", "steps": 16, "samples": 8},
    },
    "tooluse-qwen7b.toml": {
        "serve": {"model": "Qwen/Qwen2.5-7B-Instruct", "tool_call_parser": "hermes"},  # Qwen2.5's tool-call format
        "update": {"model": "Qwen/Qwen2.5-7B-Instruct", "groups_per_step": 16, "lr": 1e-6, "ref_every": 100,
                   "ref_alpha": 1.0, "epsilon": 0.2, "epochs": 2, "drop_unparseable": True},
        "collect": {"domain": "tool_use", "group_size": 8, "capacity": 640, "min_buffer": 320, "p_buffer": 0.5,
                    "p_diverge": 0.5, "max_turns": 10},
        "evaluate": {"domain": "tool_use", "steps": 4, "samples": 8, "max_turns": 60},
    },
    "mle-r1qwen7b.toml": {
        "serve": {"model": "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "reasoning_parser": "deepseek_r1"},
        "update": {"model": "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "groups_per_step": 4, "lr": 1e-6,
                   "ref_every": 100, "ref_alpha": 0.5, "epsilon": 0.2},
        "collect": {"domain": "mle", "group_size": 8, "capacity": 24, "min_buffer": 3, "p_buffer": 0.5,
                    "p_diverge": 0.5, "eval_timeout_s": 300.0},
        "evaluate": {"domain": "mle", "steps": 16, "eval_timeout_s": 300.0},
    },
}
CONFIGS: dict[str, tuple[type, list[str]]] = {
    "serve": (ServeConfig, []), "collect": (CollectConfig, []), "evaluate": (EvalConfig, ["--out", "e.json"]),
    "update": (UpdateConfig, []), "run": (RunConfig, []),
}


def load(recipe: Path, section: str) -> Any:
    config_type, required = CONFIGS[section]
    parser = argparse.ArgumentParser(prog=f"python -m {section}")
    config.add_arguments(parser, config_type)
    return config.from_args(config_type, config.parse_args(parser, ["--config", str(recipe), *required], section))


def test_every_recipe_is_checked() -> None:
    assert sorted(p.name for p in RECIPES.glob("*.toml")) == sorted(PAPER)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_recipe_holds_the_papers_values(name: str) -> None:
    recipe = RECIPES / name
    loaded = {section: load(recipe, section) for section in CONFIGS}  # run too: no key of the file breaks it
    for section, expected in PAPER[name].items():
        for key, value in expected.items():
            assert getattr(loaded[section], key) == value, f"{name} [{section}] {key}"
    # what the trainer corrects for must be what collect sampled with
    assert loaded["update"].temperature == loaded["collect"].temperature
    assert loaded["collect"].max_context <= loaded["serve"].max_model_len
    assert loaded["update"].run_dir == loaded["collect"].run_dir == loaded["serve"].weights_dir.parent
    # collect builds the curriculum from these: the domain preset must agree with the recipe
    curriculum = loaded["collect"].curriculum()
    assert (curriculum.capacity, curriculum.min_buffer) == (PAPER[name]["collect"]["capacity"],
                                                            PAPER[name]["collect"]["min_buffer"])


@pytest.mark.parametrize("name", sorted(PAPER))
def test_recipe_goes_through_variants_to_run(name: str, tmp_path: Path) -> None:
    """variants reads its own section and hands the file to every run it starts."""
    parser = argparse.ArgumentParser(prog="python -m exitagent.variants")
    parser.add_argument("--seeds", default="0,1")
    _, rest = config.parse_known_args(parser, ["--config", str(RECIPES / name)], "variants")
    assert variants.parse_config(["--run-dir", str(tmp_path), *rest]).temperature == 1.0
