"""Reading PEFT adapters: key layouts, scaling parity with PEFT, rejection of bad input."""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from valora.errors import InvalidAdapterError
from valora.lora.peft_format import BaseModelShapes, load_peft_adapter
from valora.testing.checkpoints import (
    TinySpec,
    build_tiny_adapter,
    build_tiny_llama,
    build_tiny_llava,
)

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def copy_adapter(src: Path, dst: Path, *, config: dict[str, object] | None = None,
                 tensors: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
                 ) -> Path:
    """Copy an adapter directory, optionally updating config fields and rewriting tensors."""
    shutil.copytree(src, dst)
    if config is not None:
        data = json.loads((dst / CONFIG).read_text())
        data.update(config)
        (dst / CONFIG).write_text(json.dumps(data))
    if tensors is not None:
        save_file(tensors(load_file(str(dst / WEIGHTS))), str(dst / WEIGHTS))
    return dst


def test_loads_every_module_with_peft_shapes(adapter_dir: Path,
                                             base_shapes: BaseModelShapes) -> None:
    adapter = load_peft_adapter("a", adapter_dir, base_shapes)
    raw = load_file(str(adapter_dir / WEIGHTS))
    assert adapter.rank == 4 and len(adapter.modules) == 7 * base_shapes.num_layers
    assert adapter.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                      "up_proj", "down_proj")
    assert adapter.nbytes == sum(t.nbytes for t in raw.values())
    key = "base_model.model.model.language_model.layers.1.self_attn.k_proj"
    module = adapter.modules[(1, "k_proj")]
    assert torch.equal(module.a, raw[f"{key}.lora_A.weight"])
    assert torch.equal(module.b, raw[f"{key}.lora_B.weight"])
    assert module.scale == pytest.approx(8.0 / 4)


def _peft_scalings(base_dir: Path, adapter_path: Path) -> dict[tuple[int, str], tuple[float, ...]]:
    """Load with PEFT itself; return ``{(layer, module): (scaling, *A.flatten()[:3])}``."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import LlavaForConditionalGeneration

    model = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(str(base_dir)),
                                      str(adapter_path))
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.scaling:
            parts = name.split(".")
            layer = int(parts[parts.index("layers") + 1])
            a = module.lora_A["default"].weight.detach()
            out[(layer, parts[-1])] = (float(module.scaling["default"]), *a.flatten()[:3].tolist())
    return out


@pytest.mark.parametrize("variant", ["plain", "rslora", "patterns", "rslora_patterns"])
def test_scaling_matches_peft(variant: str, llava_dir: Path, base_shapes: BaseModelShapes,
                              tmp_path: Path) -> None:
    """PEFT writes the adapter (rank/alpha patterns, rsLoRA) and loads it; scalings agree."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    patterns = variant.endswith("patterns")
    config = LoraConfig(
        r=4, lora_alpha=6, use_rslora=variant.startswith("rslora"), init_lora_weights=False,
        target_modules=r".*language_model.*\.(q_proj|v_proj|o_proj|up_proj|down_proj)",
        rank_pattern={"layers.0.self_attn.q_proj": 2, "v_proj": 3} if patterns else {},
        alpha_pattern={r"layers\.1\..*down_proj": 5, "o_proj": 16} if patterns else {})
    torch.manual_seed(0)
    model = get_peft_model(LlavaForConditionalGeneration.from_pretrained(str(llava_dir)), config)
    model.save_pretrained(str(tmp_path / "peft"))
    adapter = load_peft_adapter("p", tmp_path / "peft", base_shapes)
    expected = _peft_scalings(llava_dir, tmp_path / "peft")
    assert set(adapter.modules) == set(expected)
    for key, (scaling, *a_head) in expected.items():
        assert adapter.modules[key].scale == pytest.approx(scaling, rel=1e-12), key
        assert adapter.modules[key].a.flatten()[:3].tolist() == pytest.approx(a_head)
    if patterns:
        assert adapter.modules[(0, "q_proj")].rank == 2 and adapter.modules[(1, "q_proj")].rank == 4
        assert adapter.modules[(1, "v_proj")].rank == 3
        assert len({adapter.modules[(i, "down_proj")].scale for i in range(2)}) == 2


def test_tiny_adapter_builder_scaling_matches_peft(llava_dir: Path, base_shapes: BaseModelShapes,
                                                   tmp_path: Path) -> None:
    path = build_tiny_adapter(llava_dir, tmp_path / "rs", rank=4, alpha=3.0, use_rslora=True)
    adapter = load_peft_adapter("rs", path, base_shapes)
    for key, (scaling, *_rest) in _peft_scalings(llava_dir, path).items():
        assert scaling == pytest.approx(3 / math.sqrt(4))
        assert adapter.modules[key].scale == pytest.approx(scaling)


def _rename(prefix_from: str, prefix_to: str, infix: str = ""
            ) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    def rewrite(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for key, value in tensors.items():
            key = key.replace(prefix_from, prefix_to)
            out[key.replace(".weight", f"{infix}.weight")] = value
        return out
    return rewrite


@pytest.mark.parametrize("rewrite", [
    _rename("base_model.model.model.language_model.", "base_model.model.language_model.model."),
    _rename("x", "x", infix=".default"),
    _rename("base_model.model.model.language_model.", "base_model.model.language_model.model.",
            infix=".my-task"),
], ids=["legacy_llava", "adapter_name_infix", "legacy_with_infix"])
def test_key_layouts_decode_identically(rewrite: Callable[[dict[str, torch.Tensor]],
                                                          dict[str, torch.Tensor]],
                                        adapter_dir: Path, base_shapes: BaseModelShapes,
                                        tmp_path: Path) -> None:
    original = load_peft_adapter("a", adapter_dir, base_shapes)
    other = load_peft_adapter("b", copy_adapter(adapter_dir, tmp_path / "b", tensors=rewrite),
                              base_shapes)
    assert other.digest == original.digest
    assert all(torch.equal(other.modules[k].b, m.b) for k, m in original.modules.items())


def test_plain_llama_adapter_and_bin_fallback(tmp_path: Path) -> None:
    llama = build_tiny_llama(tmp_path / "llama", TinySpec(num_layers=1))
    path = build_tiny_adapter(llama, tmp_path / "ad", rank=2, targets=("q_proj", "down_proj"))
    shapes = BaseModelShapes.from_config_json(llama)
    adapter = load_peft_adapter("l", path, shapes)
    assert set(adapter.modules) == {(0, "q_proj"), (0, "down_proj")}
    torch.save(load_file(str(path / WEIGHTS)), str(path / "adapter_model.bin"))
    (path / WEIGHTS).unlink()
    assert load_peft_adapter("l", path, shapes).digest == adapter.digest


def test_digest_stable_and_content_sensitive(adapter_dir: Path, base_shapes: BaseModelShapes,
                                             tmp_path: Path) -> None:
    first = load_peft_adapter("a", adapter_dir, base_shapes)
    assert load_peft_adapter("renamed", adapter_dir, base_shapes).digest == first.digest

    def bump_one(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        key = sorted(tensors)[5]
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0] += 1e-3
        return tensors

    changed = load_peft_adapter("c", copy_adapter(adapter_dir, tmp_path / "c", tensors=bump_one),
                                base_shapes)
    alpha = load_peft_adapter("d", copy_adapter(adapter_dir, tmp_path / "d",
                                                config={"lora_alpha": 9}), base_shapes)
    assert len({first.digest, changed.digest, alpha.digest}) == 3


def _drop_first_b(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if k != sorted(k for k in tensors if "lora_B" in k)[0]}


def _poison(value: float) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    def rewrite(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        key = sorted(tensors)[0]
        tensors[key] = tensors[key].clone()
        tensors[key][0, 1] = value
        return tensors
    return rewrite


def _add(key: str, shape: tuple[int, ...]) -> Callable[[dict[str, torch.Tensor]],
                                                       dict[str, torch.Tensor]]:
    def rewrite(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**tensors, key: torch.ones(shape)}
    return rewrite


_P = "base_model.model.model."
Rewrite = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
BAD_EDITS: dict[str, tuple[dict[str, object] | None, Rewrite | None, str]] = {
    "not_lora": ({"peft_type": "IA3"}, None, "only LORA"),
    "dora": ({"use_dora": True}, None, "DoRA"),
    "bias": ({"bias": "all"}, None, "bias='all'"),
    "modules_to_save": ({"modules_to_save": ["lm_head"]}, None, "modules_to_save"),
    "fan_in_fan_out": ({"fan_in_fan_out": True}, None, "fan_in_fan_out"),
    "lm_head_target": ({"target_modules": ["q_proj", "lm_head"]}, None, "LM head"),
    "embed_target": ({"target_modules": ["embed_tokens"]}, None, "token embedding"),
    "pissa": ({"init_lora_weights": "pissa_niter_4"}, None, "modified base weights"),
    "rank_disagrees": ({"r": 8, "lora_alpha": 16}, None, "rank 4 but adapter_config"),
    "rank_pattern_disagrees": ({"rank_pattern": {"layers.1.mlp.up_proj": 2}}, None,
                               "layer 1 up_proj: weights have rank 4"),
    "rank_pattern_value": ({"rank_pattern": {"q_proj": "4"}}, None,
                           "rank_pattern['q_proj'] = '4' is not a valid rank"),
    "alpha_pattern_regex": ({"alpha_pattern": {"q_proj(": 4}}, None,
                            "not a valid regular expression"),
    "lone_a": (None, _drop_first_b, "has lora_A but no lora_B"),
    "nan": (None, _poison(float("nan")), "NaN or Inf"),
    "inf": (None, _poison(float("inf")), "NaN or Inf"),
    "vision_tower": (None, _add(_P + "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj"
                                ".lora_A.weight", (4, 32)), "vision tower"),
    "projector": (None, _add(_P + "multi_modal_projector.linear_1.lora_A.weight", (4, 32)),
                  "multimodal projector"),
    "embedding": (None, _add(_P + "language_model.embed_tokens.lora_embedding_A", (4, 10)),
                  "embedding"),
    "lm_head_tensor": (None, _add("base_model.model.lm_head.lora_A.weight", (4, 64)), "LM head"),
    "dora_vector": (None, _add(_P + "language_model.layers.0.self_attn.q_proj."
                               "lora_magnitude_vector.default.weight", (64,)), "DoRA"),
    "rotary": (None, _add(_P + "language_model.layers.0.self_attn.rotary.lora_A.weight", (4, 64)),
               "outside the supported language projections"),
}


@pytest.mark.parametrize("case", sorted(BAD_EDITS))
def test_rejects_bad_adapters(case: str, adapter_dir: Path, base_shapes: BaseModelShapes,
                              tmp_path: Path) -> None:
    config, rewrite, message = BAD_EDITS[case]
    path = copy_adapter(adapter_dir, tmp_path / case, config=config, tensors=rewrite)
    with pytest.raises(InvalidAdapterError, match=re.escape(message)):
        load_peft_adapter(case, path, base_shapes)


def test_rejects_missing_files_and_corrupt_weights(adapter_dir: Path, base_shapes: BaseModelShapes,
                                                   tmp_path: Path) -> None:
    with pytest.raises(InvalidAdapterError, match="does not exist"):
        load_peft_adapter("x", tmp_path / "nowhere", base_shapes)
    no_config = copy_adapter(adapter_dir, tmp_path / "nc")
    (no_config / CONFIG).unlink()
    with pytest.raises(InvalidAdapterError, match=r"adapter_config\.json missing"):
        load_peft_adapter("x", no_config, base_shapes)
    no_weights = copy_adapter(adapter_dir, tmp_path / "nw")
    (no_weights / WEIGHTS).unlink()
    with pytest.raises(InvalidAdapterError, match="no weights file"):
        load_peft_adapter("x", no_weights, base_shapes)
    corrupt = copy_adapter(adapter_dir, tmp_path / "cw")
    (corrupt / WEIGHTS).write_bytes((corrupt / WEIGHTS).read_bytes()[:100])
    with pytest.raises(InvalidAdapterError, match="cannot read weights"):
        load_peft_adapter("x", corrupt, base_shapes)
    bad_json = copy_adapter(adapter_dir, tmp_path / "bj")
    (bad_json / CONFIG).write_text("{not json")
    with pytest.raises(InvalidAdapterError, match="not valid JSON"):
        load_peft_adapter("x", bad_json, base_shapes)


@pytest.mark.parametrize(("spec", "message"), [
    (TinySpec(hidden_size=32, intermediate_size=64, num_heads=2), "do not fit the base model"),
    (TinySpec(num_layers=3), "layer index 2 but the base model has 2 layers"),
    (TinySpec(num_kv_heads=4), "do not fit the base model's k_proj"),
], ids=["hidden", "layers", "kv_heads"])
def test_rejects_adapter_of_another_base(spec: TinySpec, message: str, base_shapes: BaseModelShapes,
                                         tmp_path: Path) -> None:
    other = build_tiny_llava(tmp_path / "other", spec)
    path = build_tiny_adapter(other, tmp_path / "ad", rank=2)
    with pytest.raises(InvalidAdapterError, match=message):
        load_peft_adapter("other", path, base_shapes)


def test_rank_limit(adapter_dir: Path, base_shapes: BaseModelShapes) -> None:
    with pytest.raises(InvalidAdapterError, match="rank 4 exceeds max_lora_rank=2"):
        load_peft_adapter("a", adapter_dir, base_shapes, max_rank=2)
    assert load_peft_adapter("a", adapter_dir, base_shapes, max_rank=4).rank == 4


def test_loaded_weights_survive_an_in_place_rewrite_of_the_file(
        adapter_dir: Path, base_shapes: BaseModelShapes, tmp_path: Path) -> None:
    """The decoded tensors own their memory: rewriting the weights file in place (same inode,
    same size) after loading changes neither the tensors nor the digest's meaning."""
    path = copy_adapter(adapter_dir, tmp_path / "a")
    adapter = load_peft_adapter("a", path, base_shapes)
    before = {key: (m.a.clone(), m.b.clone()) for key, m in adapter.modules.items()}
    data = bytearray((path / WEIGHTS).read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header:] = bytes(len(data) - header)  # zero every tensor byte, same file size
    with (path / WEIGHTS).open("r+b") as f:
        f.write(data)
    assert all(bool((t == 0).all()) for t in load_file(str(path / WEIGHTS)).values())
    for key, module in adapter.modules.items():
        assert torch.equal(module.a, before[key][0]) and torch.equal(module.b, before[key][1])
