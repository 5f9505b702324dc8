"""The form a checkpoint is served in: its output head as a tensor of its own.

Why: vLLM's CPU backend packs every linear layer's weight into a private copy when it loads a
model (``dispatch_cpu_unquantized_gemm``). An in-place reload (``reload_weights``) re-packs the
layers whose weights it loads, but a head tied to the input embeddings loads nothing of its own,
so its packed copy keeps the weights the engine started with. The engine then serves the new body
with the BASE head. Measured on the packaged 135M model served in fp32: the canary gap of an
in-place reload grew from 0.001 to 0.01 nats over 21 updates, while the trained body with the
base model's head reproduced the served log-probabilities to 6e-6, and a fresh start on the same
checkpoint to 8e-6. (In bf16 the 0.1 tolerance hid it.)

So a checkpoint whose config ties the head is served untied: its config says
``tie_word_embeddings: false`` and a second shard holds a copy of the embedding matrix as
``lm_head.weight`` (``model.safetensors`` becomes shard 1 of 2 under an index, the form both
transformers and vLLM read).
The served model computes exactly what the tied one does, and every reload loads, and re-packs,
the head. The trainer keeps training the tied model; ``training.publish`` writes each checkpoint
in this form, and ``serve`` starts on a served-form copy of its base model (hard links plus the
head: the extra memory is one vocabulary x hidden matrix, 28M parameters for the 135M model).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import structlog

from exitagent.errors import ModelError
from exitagent.serving import checkpoints

log = structlog.get_logger(__name__)

HEAD_FILE = "lm_head.safetensors"  # beside an already sharded checkpoint
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")  # from one model.safetensors
EMBEDDING = "model.embed_tokens.weight"
HEAD = "lm_head.weight"
INDEX = "model.safetensors.index.json"


def ties_head(directory: Path) -> bool:
    config = json.loads((directory / "config.json").read_text())
    return bool(config.get("tie_word_embeddings", False))


def untie_head(directory: Path) -> bool:
    """Rewrite ``directory`` in served form (see the module docstring); False if it was already.

    Files are replaced, never written through: published files are hard links into the trainer's
    state, which must stay tied."""
    if not ties_head(directory):
        return False
    from safetensors import safe_open
    from safetensors.torch import save_file

    index_path = directory / INDEX
    index = json.loads(index_path.read_text()) if index_path.exists() else None
    source = directory / (index["weight_map"][EMBEDDING] if index else "model.safetensors")
    with safe_open(str(source), framework="pt") as weights:
        if EMBEDDING not in weights.keys():  # noqa: SIM118 (safe_open has no __contains__)
            raise ModelError(f"{source} has no {EMBEDDING}: cannot write the output head of a tied model")
        embedding = weights.get_tensor(EMBEDDING)
    if index is None:  # one file becomes two shards and an index: transformers reads an index only
        index = {"metadata": {}, "weight_map": dict.fromkeys(checkpoints.safetensors_header(source), SHARDS[0])}
        os.rename(source, directory / SHARDS[0])
        head_file = SHARDS[1]
    else:
        head_file = HEAD_FILE
    _replace(directory / head_file, lambda tmp: save_file({HEAD: embedding.contiguous()}, str(tmp),
                                                          metadata={"format": "pt"}))
    index["weight_map"][HEAD] = head_file
    _replace(index_path, lambda tmp: tmp.write_text(json.dumps(index, indent=2)))
    config = json.loads((directory / "config.json").read_text())
    config["tie_word_embeddings"] = False
    _replace(directory / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2)))
    return True


def serving_copy(model_dir: Path, cache_dir: Path) -> Path:
    """``model_dir`` itself when its head is untied, else a served-form copy under ``cache_dir``
    (made once, atomically; hard links where the filesystem allows)."""
    if not ties_head(model_dir):
        return model_dir
    key = hashlib.sha256(str(model_dir.resolve()).encode()).hexdigest()[:12]
    final = cache_dir / f"{model_dir.name}-{key}"
    if (final / checkpoints.MANIFEST).is_file() and _same_source(final, model_dir):
        return final
    tmp = cache_dir / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for path in sorted(model_dir.iterdir()):
        if path.is_file() and path.name not in (checkpoints.MANIFEST, checkpoints.READY):
            try:
                os.link(path, tmp / path.name)
            except OSError:
                shutil.copy2(path, tmp / path.name)
    untie_head(tmp)
    checkpoints.write_manifest(tmp, source=str(model_dir.resolve()), source_manifest=_manifest_digest(model_dir))
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    log.info("served_form_prepared", model=str(model_dir), path=str(final))
    return final


def _same_source(copy: Path, model_dir: Path) -> bool:
    manifest = json.loads((copy / checkpoints.MANIFEST).read_text())
    return bool(manifest.get("source_manifest") == _manifest_digest(model_dir))


def _manifest_digest(model_dir: Path) -> str:
    """What identifies the source's content: its manifest when it has one, else its files' sizes and times."""
    manifest = model_dir / checkpoints.MANIFEST
    if manifest.is_file():
        return hashlib.sha256(manifest.read_bytes()).hexdigest()
    stats = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in model_dir.iterdir() if p.is_file())
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()


def _replace(path: Path, write: Callable[[Path], object]) -> None:
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)
