"""``LLM``: the in-process Python API.

>>> llm = LLM(model="default")                                   # doctest: +SKIP
>>> llm.load_adapter("digits", "path/to/peft_adapter")           # doctest: +SKIP
>>> out = llm.generate([{"prompt": "USER: <image>\\nWhat digit? ASSISTANT:",
...                      "images": ["7.png"], "adapter": "digits"}])  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, cast

from valora.config import EngineConfig
from valora.engine.engine import LLMEngine
from valora.engine.inputs import GenerateRequest
from valora.errors import InvalidRequestError
from valora.outputs import RequestOutput
from valora.sampling_params import SamplingParams

RequestLike = str | GenerateRequest | Mapping[str, Any]

_REQUEST_FIELDS = {f.name for f in fields(GenerateRequest)}


def to_generate_request(
    item: RequestLike, default_params: SamplingParams | None, default_adapter: str | None
) -> GenerateRequest:
    """Accept a prompt string, a ``GenerateRequest`` or a mapping of its fields (``sampling_params``
    may itself be a mapping)."""
    if isinstance(item, GenerateRequest):
        return item
    if isinstance(item, str):
        return GenerateRequest(
            prompt=item, sampling_params=default_params or SamplingParams(), adapter=default_adapter
        )
    unknown = set(item) - _REQUEST_FIELDS
    if unknown:
        raise InvalidRequestError(
            f"unknown request field(s) {sorted(unknown)}; known: {sorted(_REQUEST_FIELDS)}"
        )
    data = dict(item)
    params = data.get("sampling_params", default_params or SamplingParams())
    if isinstance(params, Mapping):
        params = SamplingParams(**params)
    data["sampling_params"] = params
    data.setdefault("adapter", default_adapter)
    return GenerateRequest(**data)


class LLM:
    """Offline batch generation over one model with any number of registered adapters."""

    def __init__(
        self,
        model: str = "default",
        *,
        adapters: Mapping[str, str | Path] | None = None,
        **engine_options: Any,
    ) -> None:
        self.engine = LLMEngine(EngineConfig.create(model=model, **engine_options))
        for name, path in (adapters or {}).items():
            self.load_adapter(name, path)

    # ----- adapters ------------------------------------------------------------------------
    def load_adapter(self, name: str, path: str | Path) -> None:
        """Register a PEFT LoRA adapter directory under ``name`` (validated now, loaded on use)."""
        self.engine.parts.adapters.register(name, str(path))

    def unload_adapter(self, name: str) -> None:
        self.engine.parts.adapters.unregister(name)
        self.engine.parts.drop_adapter(name)

    def list_adapters(self) -> list[Any]:
        return list(self.engine.parts.adapters.list_adapters())

    # ----- generation ----------------------------------------------------------------------
    def generate(
        self,
        requests: RequestLike | Sequence[RequestLike],
        sampling_params: SamplingParams | None = None,
        *,
        adapter: str | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Run every request to completion; outputs come back in input order.

        Every request is validated before any runs: one bad request raises its typed error and
        nothing is generated."""
        items = (
            [requests] if isinstance(requests, str | GenerateRequest | Mapping) else list(requests)
        )
        specs = [to_generate_request(item, sampling_params, adapter) for item in items]
        ids: list[str] = []
        try:
            for spec in specs:
                ids.append(self.engine.add_request(spec).request_id)
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            self.engine.step()  # drain the abort outputs
            raise
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
        sampling_params: SamplingParams | None = None,
        *,
        adapter: str | None = None,
        images: Sequence[Any] = (),
    ) -> list[RequestOutput]:
        """Chat-template one conversation (a list of messages) or several."""
        conversations = cast(
            list[Sequence[Mapping[str, Any]]],
            [messages] if messages and isinstance(messages[0], Mapping) else list(messages),
        )
        return self.generate(
            [
                GenerateRequest(
                    messages=[dict(m) for m in conv],
                    images=list(images),
                    adapter=adapter,
                    sampling_params=sampling_params or SamplingParams(),
                )
                for conv in conversations
            ]
        )

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finals: dict[str, RequestOutput] = {}
        progress = None
        if use_tqdm:
            from tqdm import tqdm

            progress = tqdm(total=len(ids), desc="generate")
        wanted = set(ids)
        while len(finals) < len(ids):
            for output in self.engine.step():
                if output.finished and output.request_id in wanted:
                    finals[output.request_id] = output
                    if progress is not None:
                        progress.update(1)
        if progress is not None:
            progress.close()
        return [finals[rid] for rid in ids]
