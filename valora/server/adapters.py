"""``GET /v1/models`` (and ``/v1/models/{id}``) and vLLM's runtime adapter routes
``POST /v1/load_lora_adapter`` / ``POST /v1/unload_lora_adapter`` (refused with 403 unless
``enable_lora_loading`` is set).

Loading validates the whole adapter directory before registering it, so a malformed directory is
a 400 naming the defect and leaves the registry unchanged. Unloading an adapter that running
requests still use is refused (400) rather than failing those requests.

Pinning: adapters registered at start-up (``--lora-modules``, the default model's bundled
adapters) and runtime loads with ``"pinned": true`` are registered pinned — kept decoded in host
memory and listed until an explicit unload, whatever other adapters are loaded or unloaded.
``pinned`` in ``GET /v1/models`` reports that flag.
"""

from __future__ import annotations

import functools

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from valora.engine.async_engine import AsyncEngine
from valora.engine.engine import LLMEngine
from valora.server.context import ServerContext
from valora.server.errors import HTTPError, ParamError
from valora.server.response_schemas import ModelCard, ModelList
from valora.server.schemas import LoadLoRARequest, UnloadLoRARequest
from valora.server.translate import model_not_found


async def model_list(ctx: ServerContext) -> ModelList:
    """The base model first, then every registered adapter (sorted by name)."""
    base = ctx.settings.served_model_name
    cards = [ModelCard(id=base, root=str(ctx.engine.engine.parts.model_path),
                       max_model_len=ctx.engine.engine.parts.max_model_len)]
    for adapter in await ctx.engine.list_adapters():
        cards.append(ModelCard(id=adapter.name, root=adapter.path, parent=base, rank=adapter.rank,
                               residency=adapter.residency, digest=adapter.digest,
                               pinned=adapter.pinned))
    return ModelList(data=cards)


def check_adapter_name(name: str, base_name: str) -> None:
    """Refuse adapter names that requests could not address unambiguously."""
    if name == base_name or ":" in name:
        raise ParamError(f"adapter name {name!r} clashes with the base model name or contains "
                         "':' (reserved for base:adapter)", param="lora_name")


def register_startup_adapters(engine: AsyncEngine, modules: dict[str, str],
                              base_name: str) -> None:
    """Register ``modules`` (``name -> directory``) pinned, before the server accepts requests;
    the first bad name or directory raises its typed error."""
    for name, path in modules.items():
        check_adapter_name(name, base_name)
        engine.submit(functools.partial(_register_pinned, name=name, path=path)).result()


def _register_pinned(engine: LLMEngine, name: str, path: str) -> None:
    engine.parts.adapters.register(name, path, pinned=True)


def register_adapter_routes(app: FastAPI, ctx: ServerContext) -> None:
    def require_loading_enabled() -> None:
        if not ctx.settings.enable_lora_loading:
            raise HTTPError(403, "runtime adapter loading is disabled on this server; start it "
                                 "with --enable-lora-loading (or register adapters at start-up "
                                 "with --lora-modules)")

    @app.get("/v1/models")
    async def list_models() -> Response:
        return JSONResponse((await model_list(ctx)).model_dump())

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> Response:
        """OpenAI's ``models.retrieve``: one card of ``GET /v1/models``, else a 404."""
        for card in (await model_list(ctx)).data:
            if card.id == model_id:
                return JSONResponse(card.model_dump())
        raise model_not_found(model_id, ctx.settings.served_model_name)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRARequest) -> Response:
        require_loading_enabled()
        if body.load_inplace:
            raise ParamError("load_inplace is not supported: unload the adapter, then load it "
                             "again", param="load_inplace")
        check_adapter_name(body.lora_name, ctx.settings.served_model_name)
        name, path, pinned = body.lora_name, body.lora_path, body.pinned
        await ctx.engine.call(lambda e: e.parts.adapters.register(name, path, pinned=pinned))
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRARequest) -> Response:
        require_loading_enabled()
        await ctx.engine.unload_adapter(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
