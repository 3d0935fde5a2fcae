"""Loading checkpoints: layouts, shards, strictness, dummy weights and config parsing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import CheckpointFactory
from safetensors.torch import load_file, save_file

from valora.errors import ModelLoadError
from valora.models import load_model, supported_architectures
from valora.models.base import CausalLMBase, build_spec
from valora.models.config import load_checkpoint_config


def _state(model: CausalLMBase) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _assert_same_weights(a: CausalLMBase, b: CausalLMBase) -> None:
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def _copy_configs(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json"):
        shutil.copy(src / name, dst / name)
    return dst


def _rewrite(src: Path, dst: Path, rename: dict[str, str]) -> Path:
    """Copy the checkpoint at ``src`` with tensor names rewritten by prefix."""
    tensors = load_file(str(src / "model.safetensors"))
    renamed = {}
    for key, tensor in tensors.items():
        for old, new in rename.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        renamed[key] = tensor
    save_file(renamed, str(_copy_configs(src, dst) / "model.safetensors"))
    return dst


def test_sharded_checkpoint_loads_identically(checkpoint: CheckpointFactory,
                                              tmp_path: Path) -> None:
    from transformers import LlavaForConditionalGeneration

    path = checkpoint("default")
    LlavaForConditionalGeneration.from_pretrained(str(path)).save_pretrained(
        str(tmp_path), max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not (tmp_path / "model.safetensors").exists()
    single = load_model(str(path), dtype=torch.float32, device="cpu")
    _assert_same_weights(load_model(str(tmp_path), dtype=torch.float32, device="cpu"), single)


@pytest.mark.parametrize("layout", [
    {"language_model.model.": "model.language_model.", "language_model.lm_head.": "lm_head.",
     "vision_tower.": "model.vision_tower.",
     "multi_modal_projector.": "model.multi_modal_projector."},
    {"vision_tower.": "vision_tower.vision_model."},
], ids=["transformers5_module_names", "transformers4_vision_model"])
def test_llava_key_layouts_load_identically(checkpoint: CheckpointFactory, tmp_path: Path,
                                            layout: dict[str, str]) -> None:
    path = checkpoint("default")
    moved = _rewrite(path, tmp_path / "moved", layout)
    _assert_same_weights(load_model(str(moved), dtype=torch.float32, device="cpu"),
                         load_model(str(path), dtype=torch.float32, device="cpu"))


def test_tied_checkpoint_has_no_head_tensor_and_shares_embedding(
        checkpoint: CheckpointFactory) -> None:
    path = checkpoint("rope_default_tied")
    assert not any("lm_head" in key for key in load_file(str(path / "model.safetensors")))
    model = load_model(str(path), dtype=torch.float32, device="cpu")
    assert model.lm_head.tied
    assert model.lm_head.projection_weight() is model.decoder.embed_tokens.weight


def _edit(path: Path, dst: Path, edit: str) -> Path:
    tensors = load_file(str(path / "model.safetensors"))
    if edit == "missing":
        del tensors["language_model.model.layers.1.self_attn.k_proj.weight"]
    elif edit == "unexpected":
        tensors["language_model.model.layers.0.self_attn.extra_proj.weight"] = torch.zeros(2, 2)
    else:
        tensors["language_model.model.layers.0.mlp.up_proj.weight"] = torch.zeros(7, 64)
    save_file(tensors, str(_copy_configs(path, dst) / "model.safetensors"))
    return dst


@pytest.mark.parametrize(("edit", "message"), [
    ("missing", r"lacks 1 tensor.*layers\.1\.self_attn\.k_proj\.weight"),
    ("unexpected", r"unexpected tensor .*layers\.0\.self_attn\.extra_proj\.weight"),
    ("misshaped", r"layers\.0\.mlp\.up_proj\.weight.*shape \[7, 64\].*\[128, 64\]"),
])
def test_bad_checkpoints_name_the_tensor(checkpoint: CheckpointFactory, tmp_path: Path,
                                         edit: str, message: str) -> None:
    broken = _edit(checkpoint("default"), tmp_path / edit, edit)
    with pytest.raises(ModelLoadError, match=message):
        load_model(str(broken), dtype=torch.float32, device="cpu")


def test_dummy_load_needs_only_a_config(checkpoint: CheckpointFactory, tmp_path: Path) -> None:
    path = checkpoint("default")
    bare = _copy_configs(path, tmp_path / "bare")
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors"):
        load_model(str(bare), dtype=torch.float32, device="cpu")
    model = load_model(str(bare), dtype=torch.bfloat16, device="cpu", load_format="dummy", seed=3)
    reference = load_model(str(path), dtype=torch.bfloat16, device="cpu")
    shapes = {name: (p.shape, p.dtype) for name, p in reference.named_parameters()}
    assert {name: (p.shape, p.dtype) for name, p in model.named_parameters()} == shapes
    again = load_model(str(bare), dtype=torch.bfloat16, device="cpu", load_format="dummy", seed=3)
    _assert_same_weights(model, again)
    other = load_model(str(bare), dtype=torch.bfloat16, device="cpu", load_format="dummy", seed=4)
    assert not torch.equal(other.decoder.embed_tokens.weight, model.decoder.embed_tokens.weight)
    with torch.inference_mode():
        features = model.encode_images(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, 16, 64) and torch.isfinite(features.float()).all()


def _write_config(directory: Path, config: dict[str, object],
                  generation: dict[str, object] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    if generation is not None:
        (directory / "generation_config.json").write_text(json.dumps(generation))
    return directory


def test_partial_llava15_config_gets_transformers_defaults(tmp_path: Path) -> None:
    # The shape of llava-hf/llava-1.5-7b-hf's config.json: most sizes left to the defaults.
    config = {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "image_token_index": 32000, "projector_hidden_act": "gelu",
        "text_config": {"model_type": "llama", "max_position_embeddings": 4096,
                        "rms_norm_eps": 1e-05, "vocab_size": 32064},
        "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                          "model_type": "clip_vision_model", "num_attention_heads": 16,
                          "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768},
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
    }
    directory = _write_config(tmp_path / "llava15", config, {"eos_token_id": [2, 32001]})
    parsed = load_checkpoint_config(directory)
    spec = build_spec(parsed)
    sizes = (spec.hidden_size, spec.num_layers, spec.num_heads, spec.num_kv_heads)
    assert sizes == (4096, 32, 32, 32)
    assert (spec.head_dim, spec.intermediate_size, spec.vocab_size) == (128, 11008, 32064)
    assert (spec.num_image_tokens, spec.image_size, spec.image_token_id) == (576, 336, 32000)
    assert spec.eos_token_ids == (2, 32001) and spec.is_multimodal
    assert parsed.text.rope.rope_type == "default" and parsed.text.rope.theta == 10000.0


def test_legacy_rope_scaling_and_unsupported_configs(tmp_path: Path) -> None:
    base = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
            "num_attention_heads": 4, "rope_theta": 500000.0,
            "rope_scaling": {"type": "linear", "factor": 4.0}}
    parsed = load_checkpoint_config(_write_config(tmp_path / "legacy", base))
    assert (parsed.text.rope.rope_type, parsed.text.rope.theta) == ("linear", 500000.0)
    assert parsed.text.rope.factor == 4.0
    bad = {
        "arch": {**base, "architectures": ["GPT2LMHeadModel"]},
        "rope": {**base, "rope_scaling": {"rope_type": "spiral", "factor": 2.0}},
        "window": {**base, "architectures": ["MistralForCausalLM"], "model_type": "mistral",
                   "sliding_window": 128, "max_position_embeddings": 4096},
    }
    messages = {"arch": "unsupported architecture", "rope": "unsupported rope_type",
                "window": "sliding-window"}
    for name, config in bad.items():
        directory = _write_config(tmp_path / name, config)
        with pytest.raises(ModelLoadError, match=messages[name]):
            load_model(str(directory), dtype=torch.float32, device="cpu", load_format="dummy")
    assert {"LlavaForConditionalGeneration", "LlamaForCausalLM"} <= set(supported_architectures())
