"""The base model under training: a LLaVA-format checkpoint wrapped by PEFT with one LoRA.

Only the language model's linears matching ``target_modules`` (a regex, so the vision tower is
never adapted) get LoRA weights; every base weight is frozen. Because the vision tower and the
projector are frozen, image features are computed once per image (``image_features``) and
training runs the decoder alone on ``inputs_embeds`` — the same values the full model would see.

Prompts are built exactly as the engine builds them for a chat request: the tokenizer's chat
template over one user message ``[image, text]`` with the generation prompt, tokenised with
``tokenizer(text).input_ids``, then the image token expanded to ``num_image_tokens`` copies.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from valora.errors import ModelLoadError
from valora.training.spec import TrainingSpec


class Backbone:
    """A frozen LLaVA with one trainable PEFT LoRA named ``default``, on ``device`` (every
    tensor it returns lives there; callers build batches on ``self.device``)."""

    def __init__(self, base_dir: str | Path, training: TrainingSpec, seed: int,
                 device: str | torch.device = "cpu") -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        path = Path(base_dir)
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"base model directory {path} has no config.json")
        try:
            model = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32)
            self.processor = AutoProcessor.from_pretrained(str(path))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load a LLaVA model from {path}: {exc}") from exc
        self.base_dir = path.resolve()
        self.device = torch.device(device)
        self.tokenizer = self.processor.tokenizer
        config: Any = model.config
        self.config = config
        self.image_token_id = int(config.image_token_index)
        self.hidden_size = int(config.text_config.hidden_size)
        model.requires_grad_(False)
        torch.manual_seed(seed)
        lora = LoraConfig(r=training.rank, lora_alpha=training.alpha,
                          lora_dropout=training.lora_dropout,
                          target_modules=training.target_modules, bias="none",
                          task_type="CAUSAL_LM")
        self.model = get_peft_model(model, lora)
        self.model.to(self.device)
        self.model.eval()
        inner: Any = self.model.base_model.model
        self.language_model: Any = inner.model.language_model
        self.lm_head: Any = inner.lm_head
        self.llava: Any = inner.model
        if not any(p.requires_grad for p in self.language_model.parameters()):
            raise ModelLoadError(f"target_modules {training.target_modules!r} matched no "
                                 "language-model linear of the base model")
        self.num_layers = len(self.language_model.layers)
        self.first_adapted_layer = self._first_adapted_layer()
        self.num_image_tokens = int(self.image_features([Image.new("RGB", (8, 8))]).shape[1])

    def _first_adapted_layer(self) -> int:
        from peft.tuners.lora.layer import LoraLayer

        layers = [int(m.group(1)) for name, module in self.language_model.named_modules()
                  if isinstance(module, LoraLayer) and (m := re.search(r"layers\.(\d+)\.", name))]
        return min(layers, default=0)

    # ----- prompts ------------------------------------------------------------------------
    def prompt_text(self, text: str) -> str:
        content = [{"type": "image"}, {"type": "text", "text": text}]
        messages = [{"role": "user", "content": content}]
        return str(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                      tokenize=False))

    def prompt_ids(self, text: str) -> list[int]:
        """Token ids of the chat prompt with the image placeholder expanded."""
        ids: list[int] = []
        for token in self.tokenizer(self.prompt_text(text)).input_ids:
            ids += [token] * self.num_image_tokens if token == self.image_token_id else [token]
        return ids

    def answer_ids(self, text: str, answer: str) -> list[int]:
        """Ids the assistant turn adds after the prompt, up to and including end-of-sequence."""
        user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}
        full = str(self.tokenizer.apply_chat_template(
            [user, {"role": "assistant", "content": answer}], tokenize=False))
        prompt = self.prompt_text(text)
        tail = full[len(prompt):] if full.startswith(prompt) else f" {answer}"
        ids = list(self.tokenizer(tail, add_special_tokens=False).input_ids)
        eos = self.tokenizer.eos_token_id
        return ids[:ids.index(eos) + 1] if eos in ids else [*ids, eos]

    # ----- tensors ------------------------------------------------------------------------
    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Projected image features ``[n, num_image_tokens, hidden]`` (frozen tower)."""
        pixels = self.processor.image_processor(list(images), return_tensors="pt")["pixel_values"]
        out = self.llava.get_image_features(
            pixel_values=pixels.float().to(self.device), vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy)
        return torch.stack(list(out.pooler_output))

    def embed(self, ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``[b, L, h]`` with each row's image tokens replaced by ``features
        [b, num_image_tokens, h]`` (rows must hold exactly that many image tokens)."""
        with torch.no_grad():
            embeds = self.language_model.embed_tokens(ids)
        mask = (ids == self.image_token_id).unsqueeze(-1).expand_as(embeds)
        return embeds.masked_scatter(mask, features.to(embeds.dtype))

    def hidden_states(self, embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final-normed decoder hidden states ``[b, L, h]`` (LoRA active unless disabled)."""
        out = self.language_model(inputs_embeds=embeds, attention_mask=attention_mask)
        return out.last_hidden_state

    def _run_layers(self, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int,
                    end: int) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        lm = self.language_model
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        causal = create_causal_mask(config=lm.config, inputs_embeds=hidden,
                                    attention_mask=attention_mask, cache=None,
                                    position_ids=positions)
        rope = lm.rotary_emb(hidden, position_ids=positions)
        for layer in lm.layers[start:end]:
            hidden = layer(hidden, attention_mask=causal, position_ids=positions,
                           position_embeddings=rope)
        return hidden

    @torch.no_grad()
    def prefix_states(self, embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states entering the first adapted layer (frozen below it, so computed once per
        training example when LoRA targets only upper layers)."""
        return self._run_layers(embeds, attention_mask, 0, self.first_adapted_layer)

    def hidden_from_prefix(self, prefix: torch.Tensor,
                           attention_mask: torch.Tensor) -> torch.Tensor:
        """``hidden_states`` resumed from ``prefix_states``: the same values, less compute."""
        hidden = self._run_layers(prefix, attention_mask, self.first_adapted_layer, self.num_layers)
        return self.language_model.norm(hidden)

    @torch.no_grad()
    def greedy(self, ids: torch.Tensor, features: torch.Tensor,
               max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations of equal-length prompts ``ids [b, L]`` (stop at end-of-sequence)."""
        eos = self.tokenizer.eos_token_id
        embeds = self.embed(ids, features)
        out = self.language_model(inputs_embeds=embeds, use_cache=True)
        cache = out.cache
        tokens: list[list[int]] = [[] for _ in range(ids.shape[0])]
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        last = out.last_hidden_state[:, -1]
        for _ in range(max_new_tokens):
            nxt = self.lm_head(last).argmax(dim=-1)
            for row, token in enumerate(nxt.tolist()):
                if not done[row]:
                    tokens[row].append(token)
            done |= nxt == eos
            if bool(done.all()):
                break
            step = self.language_model(inputs_embeds=self.language_model.embed_tokens(nxt)[:, None],
                                       cache=cache, use_cache=True)
            cache, last = step.cache, step.last_hidden_state[:, -1]
        return tokens

    def decode_text(self, tokens: list[int]) -> str:
        return str(self.tokenizer.decode(tokens, skip_special_tokens=True)).strip()

    # ----- LoRA state ---------------------------------------------------------------------
    def lora_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def reset_lora(self, seed: int) -> None:
        """Fresh LoRA weights (A random, B zero: the adapter starts as the identity)."""
        from peft.tuners.lora.layer import LoraLayer

        torch.manual_seed(seed)
        for module in self.model.modules():
            if isinstance(module, LoraLayer):
                module.reset_lora_parameters("default", True)

    def lora_state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model).items()}

    def load_lora_state(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.model, state)

    def save_adapter(self, directory: Path) -> None:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT format)."""
        self.model.save_pretrained(str(directory))

    @contextlib.contextmanager
    def lora_disabled(self) -> Iterator[None]:
        """Run the plain base model inside this block."""
        with self.model.disable_adapter():
            yield
