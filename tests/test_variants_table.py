"""The variants table: mean and spread over seeds; one base measurement per seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exitagent.types import Variant
from exitagent.variants import summarise, write_table


def fake_run(root: Path, variant: Variant, seed: int, base: list[float], trained: list[float]) -> Path:
    directory = root / f"{variant.value}-s{seed}"
    (directory / "eval").mkdir(parents=True)
    for name, curve in (("base", base), ("trained", trained)):
        result = {"accuracy_by_step": curve, "delta_k": curve[-1] - curve[0]}
        (directory / "eval" / f"{name}.json").write_text(json.dumps(result))
    return directory


def test_mean_and_spread_over_seeds_and_one_base_per_seed(tmp_path: Path) -> None:
    runs = {
        Variant.GRPO: [fake_run(tmp_path, Variant.GRPO, 0, [0.3, 0.2], [0.4, 0.4]),
                       fake_run(tmp_path, Variant.GRPO, 1, [0.5, 0.4], [0.6, 0.5])],
        Variant.EXIT: [fake_run(tmp_path, Variant.EXIT, 0, [0.3, 0.2], [0.4, 0.6]),
                       fake_run(tmp_path, Variant.EXIT, 1, [0.5, 0.4], [0.5, 0.7])],
    }
    table = summarise(runs)
    assert table["base"]["seeds"] == 2 and table["base"]["curve"] == pytest.approx([0.4, 0.3])
    grpo, exit_ = table["variants"]["grpo"], table["variants"]["exit"]
    assert grpo["accuracy_after_k"] == pytest.approx((0.45, 0.05))
    assert grpo["delta_k"] == pytest.approx((-0.05, 0.05))
    assert exit_["delta_k"] == pytest.approx((0.2, 0.0))
    text = write_table(tmp_path, table).read_text()
    assert "| full ExIt | 2 | 65.0 ± 5.0 | +20.0 ± 0.0 |" in text
    assert (tmp_path / "curves.png").stat().st_size > 0
