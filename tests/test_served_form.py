"""A tied output head is served as a tensor of its own, computing exactly what the tied model does."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from exitagent.errors import ModelError
from exitagent.serving import checkpoints, served_form


def tiny_tied(directory: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    return model


def logits(directory: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)(input_ids=ids).logits


def test_the_untied_form_computes_what_the_tied_model_does_and_loads_its_own_head(tmp_path: Path) -> None:
    tiny_tied(tmp_path)
    ids = torch.tensor([[1, 5, 9, 33, 2]])
    before = logits(tmp_path, ids)
    config_inode = (tmp_path / "config.json").stat().st_ino
    assert served_form.untie_head(tmp_path)
    assert not served_form.untie_head(tmp_path)  # already in served form
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is False
    assert (tmp_path / "config.json").stat().st_ino != config_inode  # replaced, never written through
    assert "lm_head.weight" in checkpoints.tensor_shapes(tmp_path)
    torch.testing.assert_close(logits(tmp_path, ids), before, rtol=0, atol=0)
    # The head is now a parameter of its own: moving the embedding leaves it where it was.
    untied = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert untied.lm_head.weight.data_ptr() != untied.get_input_embeddings().weight.data_ptr()


def test_published_files_linked_from_the_trainer_stay_tied(tmp_path: Path) -> None:
    trainer_state, published = tmp_path / "state", tmp_path / "published"
    tiny_tied(trainer_state)
    published.mkdir()
    for path in trainer_state.iterdir():
        os.link(path, published / path.name)
    served_form.untie_head(published)
    assert served_form.ties_head(trainer_state) and not served_form.ties_head(published)
    kept = sorted(p.name for p in trainer_state.iterdir())
    assert kept == ["config.json", "generation_config.json", "model.safetensors"]


def test_serving_copy_is_made_once_and_follows_its_source(tmp_path: Path) -> None:
    source, cache = tmp_path / "model", tmp_path / "cache"
    tiny_tied(source)
    checkpoints.write_manifest(source)
    copy = served_form.serving_copy(source, cache)
    assert copy != source and not served_form.ties_head(copy) and served_form.ties_head(source)
    checkpoints.verify_manifest(copy, complete=True)
    stamp = (copy / checkpoints.MANIFEST).stat().st_mtime_ns
    assert served_form.serving_copy(source, cache) == copy
    assert (copy / checkpoints.MANIFEST).stat().st_mtime_ns == stamp  # reused, not rebuilt
    tiny_tied(source)  # the source changes: its manifest, and so the copy, follow
    (source / checkpoints.MANIFEST).unlink()
    checkpoints.write_manifest(source, note="changed")
    assert (served_form.serving_copy(source, cache) / checkpoints.MANIFEST).stat().st_mtime_ns != stamp
    assert not list(cache.glob(".tmp-*"))


def test_an_untied_model_is_served_as_it_is(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"tie_word_embeddings": False}))
    assert served_form.serving_copy(tmp_path, tmp_path / "cache") == tmp_path


def test_a_tied_checkpoint_without_an_embedding_is_a_clear_error(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    save_file({"other": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelError, match=r"no model\.embed_tokens\.weight"):
        served_form.untie_head(tmp_path)
