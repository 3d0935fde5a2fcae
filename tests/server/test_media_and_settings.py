"""Remote images (when enabled) with size and time limits, CORS when configured, settings and
CLI validation, and the Prometheus exposition format."""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from server_helpers import BASE_NAME, ThreadServer, png_bytes

from valora.cli_config import parse_lora_modules
from valora.errors import InvalidRequestError
from valora.server.cli import build_parser
from valora.server.metrics import Histogram
from valora.server.settings import ServerSettings

MAX_IMAGE_BYTES = 50_000
SLOW_RESPONSE_S = 3.0


class ImageHandler(BaseHTTPRequestHandler):
    """``/ok.png``, ``/big.png`` (over the byte limit), ``/missing.png`` (404), ``/slow.png``
    (answers after the fetch deadline) and ``/moved`` (redirects to ``/ok.png``)."""

    def do_GET(self) -> None:
        if self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", "/ok.png")
            self.end_headers()
            return
        if self.path == "/slow.png":
            time.sleep(SLOW_RESPONSE_S)
        body = {"/ok.png": png_bytes(3), "/slow.png": png_bytes(3),
                "/big.png": b"\x89PNG" + b"\x00" * (MAX_IMAGE_BYTES + 10)}.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()  # no Content-Length: the limit must hold while streaming
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the fetcher gave up
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def image_server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ImageHandler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def image_chat(url: str) -> dict[str, object]:
    return {"model": BASE_NAME, "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what?"}]}]}


def test_remote_images_when_enabled(start_thread_server: Callable[..., ThreadServer],
                                    image_server: str) -> None:
    settings = ServerSettings(served_model_name=BASE_NAME, allow_remote_images=True,
                              remote_image_timeout_s=1.0)
    server = start_thread_server(settings=settings, max_image_bytes=MAX_IMAGE_BYTES)
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for path in ("/ok.png", "/moved"):
            response = http.post("/v1/chat/completions", json=image_chat(image_server + path))
            assert response.status_code == 200, response.text
        for path, needle in (("/big.png", "limit"), ("/missing.png", "HTTP 404"),
                             ("/slow.png", "longer than")):
            response = http.post("/v1/chat/completions", json=image_chat(image_server + path))
            assert response.status_code == 400, response.text
            assert needle in response.json()["error"]["message"]


def test_cors_only_for_configured_origins(start_thread_server: Callable[..., ThreadServer]) -> None:
    settings = ServerSettings(served_model_name=BASE_NAME, cors_allow_origins=("http://ok.example",))
    server = start_thread_server(settings=settings)
    preflight = {"Access-Control-Request-Method": "POST"}
    allowed = httpx.options(f"{server.url}/v1/chat/completions",
                            headers={"Origin": "http://ok.example", **preflight})
    assert allowed.headers.get("access-control-allow-origin") == "http://ok.example"
    refused = httpx.options(f"{server.url}/v1/chat/completions",
                            headers={"Origin": "http://evil.example", **preflight})
    assert "access-control-allow-origin" not in refused.headers


@pytest.mark.parametrize("kwargs, needle", [
    ({"served_model_name": " spaced "}, "served_model_name"), ({"api_keys": ("",)}, "api keys"),
    ({"max_body_bytes": 0}, "max_body_bytes"), ({"max_prompt_tokens": 0}, "max_prompt_tokens"),
    ({"allowed_local_media_path": Path("/definitely/not/here")}, "not a directory"),
])
def test_settings_are_validated(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(InvalidRequestError, match=needle):
        ServerSettings(**kwargs)  # type: ignore[arg-type]


def test_cli_flags() -> None:
    args = build_parser().parse_args(["--lora-modules", "a=/x", "b=/y", "--lora-modules", "c=/z",
                                      '{"name": "d", "path": "/w", "base_model_name": "m"}',
                                      "--api-key", "k1", "--max-loras", "3"])
    assert parse_lora_modules(args.lora_modules) == {"a": "/x", "b": "/y", "c": "/z", "d": "/w"}
    assert args.host == "127.0.0.1" and args.port == 8000 and args.max_loras == 3
    assert args.default_adapters and not build_parser().parse_args(
        ["--no-default-adapters"]).default_adapters
    for bad in ("no-equals-sign", "=/x", "a=", '{"name": "a"}', "{not json"):
        with pytest.raises(SystemExit, match="NAME=PATH"):
            parse_lora_modules([bad])


def test_histogram_exposition() -> None:
    histogram = Histogram([0.1, 1.0])
    for value in (0.05, 0.1, 0.5, 7.0):
        histogram.observe(value)
    lines = histogram.render("x")
    assert lines[:3] == ['x_bucket{le="0.1"} 2', 'x_bucket{le="1.0"} 3', 'x_bucket{le="+Inf"} 4']
    assert lines[4] == "x_count 4" and re.fullmatch(r"x_sum 7\.65\d*", lines[3])
