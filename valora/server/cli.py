"""``valora serve``: build the engine from its flags, register adapters, run uvicorn.

With no arguments it serves the embedded default model and the adapters bundled with it
(``valora.assets.default_adapter_paths()``; ``--no-default-adapters`` leaves them out) on
http://127.0.0.1:8000. Start-up adapters (bundled and ``--lora-modules``) are registered pinned:
they stay listed and servable until explicitly unloaded. Engine flags are derived from the config
dataclasses (``cli_config``); the flags below are the HTTP layer's (``ServerSettings``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from valora.cli_config import add_engine_flags, engine_kwargs, parse_lora_modules
from valora.logger import get_logger

logger = get_logger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="valora serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    server.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    server.add_argument("--served-model-name", default=None,
                        help="the base model's id in the API (default: the --model value)")
    server.add_argument("--lora-modules", nargs="+", action="extend", default=[],
                        metavar="NAME=PATH",
                        help="PEFT adapter directories to register (pinned) at start-up; a name "
                             "also bundled with the default model replaces that one")
    server.add_argument("--no-default-adapters", dest="default_adapters", action="store_false",
                        help="do not serve the adapters bundled with the embedded default model")
    server.add_argument("--api-key", action="append", default=[],
                        help="require 'Authorization: Bearer KEY' on /v1 routes (repeatable)")
    server.add_argument("--enable-lora-loading", action="store_true",
                        help="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter")
    server.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                        help="accept file:// image URLs for files under DIR (default: refused)")
    server.add_argument("--allow-remote-images", action="store_true",
                        help="fetch http(s) image URLs (default: refused)")
    server.add_argument("--remote-image-timeout-s", type=float, default=10.0,
                        help="time limit of one remote image fetch (default: 10)")
    server.add_argument("--max-body-bytes", type=int, default=64 * 1024 * 1024,
                        help="larger request bodies get 413 before they are parsed "
                             "(default: 64 MiB)")
    server.add_argument("--max-prompt-tokens", type=int, default=None,
                        help="refuse longer prompts, image tokens included "
                             "(default: the context length)")
    server.add_argument("--default-max-tokens", type=int, default=256,
                        help="output budget of chat requests that set none (default: 256)")
    server.add_argument("--cors-allow-origins", nargs="*", default=[],
                        help="origins allowed by CORS (default: none, CORS off)")
    server.add_argument("--uvicorn-log-level", default="warning",
                        help="uvicorn's own log level (default: warning)")
    add_engine_flags(parser)
    return parser


def startup_adapters(model: str, lora_modules: list[str],
                     default_adapters: bool = True) -> dict[str, str]:
    """``name -> directory`` of the adapters to register at start-up: the bundled adapters when
    ``model`` is the embedded default one and ``default_adapters`` is set, then ``lora_modules``
    (``NAME=PATH`` items; a repeated name takes the later path)."""
    from valora.assets import default_adapter_paths

    modules: dict[str, str] = {}
    if model == "default" and default_adapters:
        modules.update({name: str(path) for name, path in default_adapter_paths().items()})
    modules.update(parse_lora_modules(lora_modules))
    return modules


def main(argv: list[str] | None = None) -> int:
    """Run the server until interrupted; returns the process exit code."""
    import uvicorn

    from valora.config import EngineConfig
    from valora.engine.async_engine import AsyncEngine
    from valora.server.adapters import register_startup_adapters
    from valora.server.app import create_app
    from valora.server.settings import ServerSettings

    args = build_parser().parse_args(argv)
    kwargs = engine_kwargs(args)
    model = str(kwargs.get("model", "default"))
    settings = ServerSettings(
        served_model_name=args.served_model_name or model,
        api_keys=tuple(args.api_key),
        cors_allow_origins=tuple(args.cors_allow_origins),
        max_body_bytes=args.max_body_bytes,
        max_prompt_tokens=args.max_prompt_tokens,
        default_max_tokens=args.default_max_tokens,
        allowed_local_media_path=Path(media) if (media := args.allowed_local_media_path) else None,
        allow_remote_images=args.allow_remote_images,
        remote_image_timeout_s=args.remote_image_timeout_s,
        enable_lora_loading=args.enable_lora_loading,
    )
    modules = startup_adapters(model, args.lora_modules, args.default_adapters)
    engine = AsyncEngine.from_config(EngineConfig.create(**kwargs))
    try:
        register_startup_adapters(engine, modules, settings.served_model_name)
        logger.info("registered %d start-up adapter(s): %s", len(modules),
                    ", ".join(modules) or "none")
        app = create_app(engine, settings)
        logger.info("serving %s on http://%s:%d", settings.served_model_name, args.host, args.port)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                    timeout_graceful_shutdown=5)
    finally:
        engine.shutdown()
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
