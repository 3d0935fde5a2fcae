"""Latency of a classification request answered by its task head vs by decoding the label text,
both with Hugging Face transformers + PEFT on the same model, adapter and prompt.

- head:   one forward over the prompt (image tokens included) → the final-normed hidden state of
          the last prompt token → ``TaskHead.run`` → label (+ scores);
- decode: ``generate`` greedy with exactly ``decode_tokens`` new tokens (the longest label's
          tokens plus end-of-sequence, so every label fits): the same prefill, then
          ``decode_tokens - 1`` decode steps, then detokenisation.

Per-request latency (batch 1 by default), median of ``--repeats`` after two warm-ups, the two
paths interleaved; on CUDA the
clock is read after ``torch.cuda.synchronize``. Rows go to ``--out``/head_vs_decode.jsonl with
device, git sha and setup; ``summary.md`` next to it. Benchmarks time, they never assert.

    # CPU, the embedded default model (or any LLaVA directory), a built adapter with a head:
    python bench/heads/bench_head_vs_decode.py --model valora/assets/default_model \\
        --adapter build/vision_tasks/adapters/adapter_00 --task fashion --out bench/results/heads
    # GPU, dummy weights at LLaVA-1.5-7B shapes, a random rank-16 LoRA and a random head:
    python bench/heads/bench_head_vs_decode.py --dummy-config bench/model/llava-1.5-7b \\
        --out bench/results/heads
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from valora.heads import HeadSpec, TaskHead, build_task_head, load_task_head

LABELS = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
          "ankle boot")
TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return str(torch.cuda.get_device_name(device))
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    return f"cpu ({model}, {torch.get_num_threads()} threads)"


def load_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Any:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    if args.dummy_config is not None:
        config = LlavaConfig.from_dict(json.loads((args.dummy_config / "config.json").read_text()))
        torch.manual_seed(0)
        with torch.device(device):
            model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    else:
        model = LlavaForConditionalGeneration.from_pretrained(str(args.model), dtype=dtype)
        model = model.to(device)  # type: ignore[arg-type]
    if args.adapter is not None:
        return PeftModel.from_pretrained(model, str(args.adapter)).eval()
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False)
    return get_peft_model(model, lora).eval()


def load_head(args: argparse.Namespace, hidden_size: int, device: torch.device) -> TaskHead:
    head = load_task_head(args.adapter, args.task) if args.adapter is not None else None
    if head is None:
        torch.manual_seed(1)
        head = build_task_head(HeadSpec(kind="classification", task="bench", labels=LABELS,
                                        hidden_size=hidden_size, params={"mlp_hidden": 256}))
    return head.to(device).eval()


def make_inputs(args: argparse.Namespace, model: Any, device: torch.device,
                dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], Any]:
    """One request repeated ``batch`` times: image + chat prompt (or random ids for dummies)."""
    config = model.base_model.model.config
    vision = config.vision_config
    image_token = int(config.image_token_index)
    if args.dummy_config is not None:
        num_image = (vision.image_size // vision.patch_size) ** 2
        gen = torch.Generator().manual_seed(0)
        vocab = int(config.text_config.vocab_size)
        text = torch.randint(5, min(vocab, 1000), (args.prompt_tokens,), generator=gen).tolist()
        ids = text[:2] + [image_token] * num_image + text[2:]
        pixels = torch.rand(1, 3, vision.image_size, vision.image_size, generator=gen)
        tokenizer = None
    else:
        from PIL import Image
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(str(args.model))
        tokenizer = processor.tokenizer
        content = [{"type": "image"}, {"type": "text", "text": args.prompt}]
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                               add_generation_prompt=True, tokenize=False)
        image = Image.new("RGB", (28, 28), (90, 90, 90))
        batch = processor(images=[image], text=[prompt], return_tensors="pt")
        ids, pixels = batch["input_ids"][0].tolist(), batch["pixel_values"]
    inputs = {"input_ids": torch.tensor([ids] * args.batch, device=device),
              "pixel_values": pixels.repeat(args.batch, 1, 1, 1).to(device, dtype)}
    return inputs, tokenizer


def decode_tokens(args: argparse.Namespace, tokenizer: Any, labels: tuple[str, ...]) -> int:
    if args.decode_tokens is not None:
        return int(args.decode_tokens)
    if tokenizer is None:
        return 4  # "ankle boot" + end-of-sequence in a Llama tokenizer
    lengths = [len(tokenizer(f" {label}", add_special_tokens=False).input_ids) for label in labels]
    return max(lengths) + 1


def measure(fns: list[Callable[[], object]], repeats: int,
            device: torch.device) -> list[list[float]]:
    """Milliseconds per call of each function, interleaved (one call of each per round), so a
    load change on a shared machine hits every path alike."""
    for _ in range(2):
        for fn in fns:
            fn()
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, samples, strict=True):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            out.append((time.perf_counter() - start) * 1e3)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, default=None, help="LLaVA-format checkpoint")
    source.add_argument("--dummy-config", type=Path, default=None,
                        help="folder with a LLaVA config.json: random weights at its shapes")
    parser.add_argument("--adapter", type=Path, default=None, help="PEFT adapter dir with a head")
    parser.add_argument("--task", default=None, help="which named head of a fused adapter")
    parser.add_argument("--prompt", default="What kind of clothing is this?")
    parser.add_argument("--prompt-tokens", type=int, default=12, help="text tokens (dummy only)")
    parser.add_argument("--decode-tokens", type=int, default=None)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("bench/results/heads"))
    args = parser.parse_args()
    if args.model is None and args.dummy_config is None:
        from valora.assets import default_model_path

        args.model = default_model_path()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_model(args, device, dtype)
    hidden_size = int(model.base_model.model.config.text_config.hidden_size)
    head = load_head(args, hidden_size, device)
    inputs, tokenizer = make_inputs(args, model, device, dtype)
    steps = decode_tokens(args, tokenizer, head.labels)
    llava = model.base_model.model.model  # LoRA layers are injected in place

    @torch.no_grad()
    def by_head() -> list[str]:
        hidden = llava(**inputs).last_hidden_state
        return [head.run(hidden[row, -head.num_input_tokens:]).label for row in range(args.batch)]

    @torch.no_grad()
    def by_decoding() -> list[str]:
        out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1]:]
        return tokenizer.batch_decode(new) if tokenizer is not None else [str(new.tolist())]

    setup = {"bench": "head_vs_decode", "device": device_name(device), "git_sha": git_sha(),
             "model": str(args.dummy_config or args.model), "adapter": str(args.adapter),
             "dtype": str(dtype).removeprefix("torch."), "batch": args.batch,
             "prompt_tokens": int(inputs["input_ids"].shape[1]), "decode_tokens": steps,
             "repeats": args.repeats, "peer": "HF transformers + PEFT (both paths)"}
    rows = []
    timings = measure([by_head, by_decoding], args.repeats, device)
    for path, samples in zip(("head", "decode"), timings, strict=True):
        rows.append({**setup, "path": path, "median_ms": statistics.median(samples),
                     "min_ms": min(samples), "max_ms": max(samples)})
    speedup = rows[1]["median_ms"] / rows[0]["median_ms"]
    rows.append({**setup, "path": "ratio", "decode_over_head": speedup})
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "head_vs_decode.jsonl").open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    adapter = "random LoRA + head" if args.adapter is None else str(args.adapter)
    summary = (f"| device | model | adapter | batch | prompt tokens | decode tokens | head ms | "
               f"decode ms | decode/head |\n|---|---|---|---|---|---|---|---|---|\n"
               f"| {setup['device']} | {setup['model']} | {adapter} | {args.batch} | "
               f"{setup['prompt_tokens']} | {steps} | {rows[0]['median_ms']:.2f} | "
               f"{rows[1]['median_ms']:.2f} | {speedup:.2f}× |\n")
    with (args.out / "summary.md").open("a") as f:
        f.write(summary)
    print(summary)


if __name__ == "__main__":
    main()
