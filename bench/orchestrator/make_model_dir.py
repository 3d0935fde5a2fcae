"""Write a checkpoint directory for ``load_format="dummy"`` serving at LLaVA-1.5-7B shapes.

The engine needs a directory with ``config.json`` plus a tokenizer and an image processor. This
script takes the shapes (decoder, vision tower, projector) from
``bench/model/llava-1.5-7b/config.json`` and the tokenizer / chat template / processor files from
the embedded default model (its small vocabulary fits the 7B embedding table; the image token id
and the processor's image size are rewritten to match). No weights are written: serve it with
``--load-format dummy``. ``--tiny`` keeps the default model's shapes (a CPU smoke test of the same
path).

    PYTHONPATH=$PWD python bench/orchestrator/make_model_dir.py --out /tmp/llava-7b-dummy
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from valora.engine.components import resolve_model_path

SHAPES = Path(__file__).resolve().parents[1] / "model" / "llava-1.5-7b" / "config.json"
COPIED = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
          "generation_config.json", "special_tokens_map.json")
TEXT_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "vocab_size")
VISION_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "image_size", "patch_size", "projection_dim", "layer_norm_eps")


def build_config(default: dict[str, Any], shapes: dict[str, Any]) -> dict[str, Any]:
    """``default``'s config with ``shapes``' decoder and vision sizes (tokenizer ids kept)."""
    config = json.loads(json.dumps(default))
    text, vision = config["text_config"], config["vision_config"]
    for key in TEXT_KEYS:
        text[key] = shapes["text_config"][key]
    text["head_dim"] = text["hidden_size"] // text["num_attention_heads"]
    text["vocab_size"] = max(int(text["vocab_size"]), int(default["text_config"]["vocab_size"]))
    for key in VISION_KEYS:
        vision[key] = shapes["vision_config"][key]
    config["vision_feature_layer"] = shapes.get("vision_feature_layer", -2)
    config["image_seq_length"] = (vision["image_size"] // vision["patch_size"]) ** 2
    config["dtype"] = "bfloat16"
    return config


def build_processor(processor: dict[str, Any], image_size: int) -> dict[str, Any]:
    """The processor config with the vision tower's input size."""
    result = json.loads(json.dumps(processor))
    image = result.get("image_processor", result)
    image["crop_size"] = {"height": image_size, "width": image_size}
    image["size"] = {"shortest_edge": image_size}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="keep the default model's shapes")
    parser.add_argument("--layers", type=int, default=None,
                        help="override decoder and vision layer counts (CPU checks of the path)")
    args = parser.parse_args(argv)
    source = resolve_model_path("default")
    default = json.loads((source / "config.json").read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        if (source / name).is_file():
            shutil.copy(source / name, args.out / name)
    config = default if args.tiny else build_config(default, json.loads(SHAPES.read_text()))
    if args.layers is not None:
        config["text_config"]["num_hidden_layers"] = args.layers
        config["vision_config"]["num_hidden_layers"] = args.layers
    (args.out / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("processor_config.json", "preprocessor_config.json"):
        if (source / name).is_file():
            processor = json.loads((source / name).read_text())
            size = int(config["vision_config"]["image_size"])
            (args.out / name).write_text(json.dumps(build_processor(processor, size), indent=2))
    text = config["text_config"]
    print(f"model dir {args.out}: hidden {text['hidden_size']}, {text['num_hidden_layers']} "
          f"layers, vocab {text['vocab_size']}, image {config['vision_config']['image_size']}px")
    return 0


if __name__ == "__main__":
    sys.exit(main())
