"""``create_app``: the FastAPI application of ``valora serve``, around an injected ``AsyncEngine``.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
``GET /v1/models/{id}``,
``POST /v1/load_lora_adapter``, ``POST /v1/unload_lora_adapter``, ``GET /health``,
``GET /metrics``. The app never owns the engine: whoever built the engine shuts it down.
FastAPI and uvicorn are needed by ``valora.server`` only (the ``server`` extra); nothing
outside this package imports it.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from valora.engine.async_engine import AsyncEngine
from valora.errors import EngineDeadError
from valora.server.adapters import register_adapter_routes
from valora.server.chat import register_chat_route
from valora.server.completions import register_completion_route
from valora.server.context import ServerContext
from valora.server.errors import error_body, install_error_handlers
from valora.server.metrics import Metrics
from valora.server.middleware import GuardMiddleware
from valora.server.settings import ServerSettings

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def create_app(engine: AsyncEngine, settings: ServerSettings | None = None) -> FastAPI:
    """Build the app; ``app.state.ctx`` holds the ``ServerContext`` (engine, settings, metrics)."""
    import valora

    settings = settings or ServerSettings()
    ctx = ServerContext(engine=engine, settings=settings, metrics=Metrics())
    app = FastAPI(title="valora", version=valora.__version__,
                  description="OpenAI-compatible serving of multimodal models with many LoRA "
                              "adapters")
    app.state.ctx = ctx
    install_error_handlers(app)
    register_chat_route(app, ctx)
    register_completion_route(app, ctx)
    register_adapter_routes(app, ctx)
    _register_probes(app, ctx)
    known = frozenset(getattr(route, "path", "") for route in app.routes)
    app.add_middleware(GuardMiddleware, settings=settings, metrics=ctx.metrics, known_routes=known)
    if settings.cors_allow_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_allow_origins),
                           allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"])
    return app


def _register_probes(app: FastAPI, ctx: ServerContext) -> None:
    @app.get("/health")
    async def health() -> Response:
        """200 while the engine serves; 503 with the reason once it is dead."""
        state = ctx.engine.health()
        if state.healthy:
            return JSONResponse({"status": "ok", "requests_in_flight": state.num_in_flight})
        body = error_body(f"the engine is dead: {state.reason}", EngineDeadError.error_type, 503)
        return JSONResponse({"status": "dead", **body}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        stats: dict[str, Any] = {}
        adapters: list[Any] = []
        try:  # a dead engine's thread still answers; a stopped thread does not
            stats = await ctx.engine.stats()
            adapters = await ctx.engine.list_adapters()
        except EngineDeadError:
            pass
        text = ctx.metrics.render(stats, ctx.engine.health(), adapters)
        return PlainTextResponse(text, media_type=PROMETHEUS_CONTENT_TYPE)
