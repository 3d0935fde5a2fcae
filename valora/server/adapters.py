"""``GET /v1/models`` and vLLM's runtime adapter routes ``POST /v1/load_lora_adapter`` /
``POST /v1/unload_lora_adapter`` (refused with 403 unless ``enable_lora_loading`` is set).

Loading validates the whole adapter directory before registering it, so a malformed directory is
a 400 naming the defect and leaves the registry unchanged. Unloading an adapter that running
requests still use is refused (400) rather than failing those requests.
"""

from __future__ import annotations

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from valora.server.context import ServerContext
from valora.server.errors import HTTPError, ParamError
from valora.server.response_schemas import ModelCard, ModelList
from valora.server.schemas import LoadLoRARequest, UnloadLoRARequest


async def model_list(ctx: ServerContext) -> ModelList:
    """The base model first, then every registered adapter (sorted by name)."""
    base = ctx.settings.served_model_name
    cards = [ModelCard(id=base, root=str(ctx.engine.engine.parts.model_path),
                       max_model_len=ctx.engine.engine.parts.max_model_len)]
    for adapter in await ctx.engine.list_adapters():
        cards.append(ModelCard(id=adapter.name, root=adapter.path, parent=base, rank=adapter.rank,
                               residency=adapter.residency, digest=adapter.digest,
                               pinned=adapter.pin_count > 0))
    return ModelList(data=cards)


def register_adapter_routes(app: FastAPI, ctx: ServerContext) -> None:
    def require_loading_enabled() -> None:
        if not ctx.settings.enable_lora_loading:
            raise HTTPError(403, "runtime adapter loading is disabled on this server; start it "
                                 "with --enable-lora-loading (or register adapters at start-up "
                                 "with --lora-modules)")

    @app.get("/v1/models")
    async def list_models() -> Response:
        return JSONResponse((await model_list(ctx)).model_dump())

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRARequest) -> Response:
        require_loading_enabled()
        if body.load_inplace:
            raise ParamError("load_inplace is not supported: unload the adapter, then load it "
                             "again", param="load_inplace")
        if body.lora_name == ctx.settings.served_model_name or ":" in body.lora_name:
            raise ParamError(f"adapter name {body.lora_name!r} clashes with the base model name or "
                             "contains ':' (reserved for base:adapter)", param="lora_name")
        await ctx.engine.load_adapter(body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRARequest) -> Response:
        require_loading_enabled()
        await ctx.engine.unload_adapter(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
