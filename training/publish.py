"""Publish trained weights for the server: an ordinary checkpoint plus the canary it must reproduce.

The directory format and the atomic write-then-mark protocol live in ``exitagent.serving.checkpoints``
(shared with the server, which must not import torch). This module adds what needs torch: saving
the model and tokenizer, and computing the canary, the log-probabilities this exact checkpoint
gives a fixed prompt, which the server compares with what vLLM serves after a reload.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from exitagent.serving import checkpoints, served_form
from exitagent.serving.checkpoints import Canary

CANARY_TEXT = (
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France, "
    "and twelve plus seven is nineteen."
)


@torch.no_grad()
def compute_canary(model: Any, tokenizer: Any, tolerance: float = 0.1) -> Canary:
    """Per-token log-probabilities of ``CANARY_TEXT`` under ``model``, computed in float32."""
    token_ids = tokenizer(CANARY_TEXT, add_special_tokens=False)["input_ids"]
    device = next(model.parameters()).device
    ids = torch.tensor([token_ids], device=device)
    with torch.autocast(device.type, enabled=False):
        logits = model(input_ids=ids).logits.float()
    logprobs = torch.log_softmax(logits[0, :-1], dim=-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    return Canary(tuple(token_ids), tuple(float(x) for x in logprobs.cpu()), tolerance)


MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def publish_from(source: Path, weights_dir: Path, step: int, canary: Canary, *, keep: int = 3,
                 dtype: str = "float32", **manifest_extra: Any) -> Path:
    """Publish the checkpoint files in ``source`` (the trainer's saved state) as step ``step``, its
    weights in ``dtype``, the dtype it will be served in.

    Files are hard-linked, not copied: instant, no extra disk, and the published directory can be
    pruned without touching the trainer's state. (Across filesystems it falls back to a copy.)
    Weights in another dtype than the state's fp32 are written cast: half the bytes to write, keep
    and load in bf16 (vLLM would cast them on load anyway, so the canary's tolerance is unchanged).
    """
    target = getattr(torch, dtype)

    def write(directory: Path) -> Canary:
        for path in sorted(source.iterdir()):
            if path.is_file() and path.suffix == ".safetensors" and _needs_cast(path, target):
                _write_cast(path, directory / path.name, target)
            elif path.is_file() and (path.name in MODEL_FILES or path.suffix == ".safetensors"):
                try:
                    os.link(path, directory / path.name)
                except OSError:
                    shutil.copy2(path, directory / path.name)
        served_form.untie_head(directory)  # replaces (never writes through) the linked files it changes
        return canary

    published = checkpoints.publish(weights_dir, step, write, **manifest_extra)
    checkpoints.prune(weights_dir, keep)
    return published


def _needs_cast(path: Path, dtype: torch.dtype) -> bool:
    """Whether ``path`` holds floating-point tensors in another dtype than ``dtype``."""
    return any(info["dtype"] in ("F32", "F16", "BF16") and info["dtype"] != _SAFETENSORS[dtype]
               for info in checkpoints.safetensors_header(path).values())


_SAFETENSORS = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _write_cast(source: Path, destination: Path, dtype: torch.dtype) -> None:
    """``source``'s floating-point tensors in ``dtype`` (a file of its own: never through a hard link)."""
    from safetensors.torch import load_file, save_file

    tensors = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in load_file(str(source)).items()}
    save_file(tensors, str(destination), metadata={"format": "pt"})


def publish_model(model: Any, tokenizer: Any, weights_dir: Path, step: int, *, keep: int = 3,
                  **manifest_extra: Any) -> Path:
    """Write ``weights_dir/step-NNNNNN`` (see ``checkpoints.publish``) and prune old checkpoints,
    never the one the server says it is serving."""
    canary = compute_canary(model, tokenizer)

    def write(directory: Path) -> Canary:
        # In the model's own dtype: vLLM casts to its serving dtype on load, and save_pretrained
        # knows which tensors are tied (an explicit state_dict would duplicate lm_head).
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        served_form.untie_head(directory)
        return canary

    path = checkpoints.publish(weights_dir, step, write, **manifest_extra)
    checkpoints.prune(weights_dir, keep)
    return path

