"""Copy the final adapters of a finished build into ``valora/assets/adapters/<name>/`` (the
adapters shipped with the package and served by default).

    python3 bench/adapters/bundle.py build/vision_tasks [--dest valora/assets/adapters]
        [--max-bytes 5000000]

Each bundled directory holds the adapter's PEFT files (``adapter_config.json``,
``adapter_model.safetensors``), its heads (``task_head.*`` and/or ``heads/<task>/``) and a
``manifest.json``::

    {"name": "digits-fashion", "base_model": "valora default model",
     "build": "examples/adapters/vision_tasks.toml",
     "tasks": {"digits": {"kind": "classification", "prompt": "What digit is shown?",
                          "labels": ["0", ...], "head": "digits", "accuracy": 0.97,
                          "requirement": 0.9}}}

``head`` is what to pass as ``task`` to ``valora.heads.load_task_head`` (``"."``: the default
head, ``null``: none). A bundle's name is its task names joined by ``-``. Only adapters whose
tasks all met their requirement are bundled; the total stays under ``--max-bytes`` (adapters are
taken in manifest order until the next one would exceed it). ``base_model_name_or_path`` in
``adapter_config.json`` is rewritten to the embedded model's package path, since the build
machine's absolute path means nothing elsewhere.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

BASE_MODEL_REF = "valora/assets/default_model"
DEFAULT_DEST = Path(__file__).resolve().parents[2] / "valora" / "assets" / "adapters"


def bundle(build_dir: Path, dest: Path, max_bytes: int) -> list[str]:
    """Write the bundles; return their names."""
    manifest: dict[str, Any] = json.loads((build_dir / "manifest.json").read_text())
    written, total = [], 0
    for adapter in manifest["adapters"]:
        tasks = {t: manifest["tasks"][t] for t in adapter["tasks"]}
        if not all(info["met"] for info in tasks.values()):
            print(f"skip {adapter['name']}: a task misses its requirement")
            continue
        if total + int(adapter["size_bytes"]) > max_bytes:
            print(f"skip {adapter['name']}: would exceed {max_bytes} bytes")
            continue
        name = "-".join(adapter["tasks"])
        target = dest / name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(build_dir / adapter["path"], target)
        config_path = target / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = BASE_MODEL_REF
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        info = {"name": name, "base_model": "valora default model (valora/assets/default_model)",
                "build": "examples/adapters/vision_tasks.toml",
                "tasks": {t: {k: v[k] for k in ("kind", "prompt", "labels", "head", "accuracy",
                                                 "requirement", "base_accuracy")}
                          for t, v in tasks.items()}}
        (target / "manifest.json").write_text(json.dumps(info, indent=2) + "\n")
        total += sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
        written.append(name)
        print(f"bundled {name} ({', '.join(adapter['tasks'])})")
    print(f"{len(written)} adapters, {total} bytes in {dest}")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("build", type=Path, help="output directory of a finished build")
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST)
    parser.add_argument("--max-bytes", type=int, default=5_000_000)
    args = parser.parse_args()
    args.dest.mkdir(parents=True, exist_ok=True)
    bundle(args.build, args.dest, args.max_bytes)


if __name__ == "__main__":
    main()
