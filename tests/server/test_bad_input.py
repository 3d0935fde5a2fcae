"""The bad-input corpus: each request gets a 4xx in OpenAI's error shape with a message naming the
problem, and the server keeps serving (a good request succeeds right after each one)."""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from server_helpers import (
    BASE_NAME,
    MAX_BODY_BYTES,
    MAX_PROMPT_TOKENS,
    Served,
    data_url,
    metric_values,
    png_bytes,
)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` pixels over a few bytes of data (a bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 4096)) + chunk(b"IEND", b""))


def solid_png(size: tuple[int, int]) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("L", size, 128).save(buffer, format="PNG")
    return buffer.getvalue()


def chat(content: Any, **extra: Any) -> dict[str, Any]:
    return {"model": BASE_NAME, "messages": [{"role": "user", "content": content}],
            "max_tokens": 2, "temperature": 0.0, **extra}


def with_image(url: str, **image_extra: Any) -> dict[str, Any]:
    return chat([{"type": "image_url", "image_url": {"url": url, **image_extra}},
                 {"type": "text", "text": "what is this?"}])


@pytest.fixture(scope="module")
def http(served: Served) -> Iterator[httpx.Client]:
    with served.client() as client:
        yield client


@pytest.fixture(scope="module")
def outside_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("outside_media") / "secret.png"
    path.write_bytes(png_bytes(9))
    return path


def expect_error(response: httpx.Response, status: int, needle: str,
                 param: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    assert needle.lower() in error["message"].lower(), error["message"]
    if param is not None:
        assert error["param"] == param


def still_serves(http: httpx.Client) -> None:
    response = http.post("/v1/chat/completions", json=chat("still there?"))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] is not None


IMAGE_CASES = {
    "corrupt": (lambda: data_url(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4), "image"),
    "truncated": (lambda: data_url(png_bytes(1, (64, 64))[:120]), "image"),
    "bomb header": (lambda: data_url(png_header_only(60_000, 60_000)), "pixel"),
    "over pixel limit": (lambda: data_url(solid_png((1000, 1000))), "pixel"),
    "not an image": (lambda: data_url(b"hello, world", "text/plain"), "not an image"),
    "not base64-encoded": (lambda: "data:image/png,rawbytes", "base64"),
    "invalid base64": (lambda: "data:image/png;base64,@@@@not-base64@@@@", "base64"),
    "remote disabled": (lambda: "http://127.0.0.1:9/cat.png", "remote image urls are disabled"),
    "unknown scheme": (lambda: "ftp://example.org/cat.png", "unsupported image url"),
}


@pytest.mark.parametrize("case", sorted(IMAGE_CASES))
def test_bad_images(http: httpx.Client, case: str) -> None:
    make_url, needle = IMAGE_CASES[case]
    expect_error(http.post("/v1/chat/completions", json=with_image(make_url())), 400, needle)
    still_serves(http)


def test_local_files_only_under_the_allowed_directory(http: httpx.Client, served: Served,
                                                      outside_png: Path) -> None:
    ok = http.post("/v1/chat/completions", json=with_image(f"file://{served.media_dir / 'ok.png'}"))
    assert ok.status_code == 200, ok.text
    traversal = f"file://{served.media_dir}/../{outside_png.parent.name}/secret.png"
    for url, needle in ((f"file://{outside_png}", "outside"), (traversal, "outside"),
                        (f"file://{served.media_dir / 'missing.png'}", "does not exist"),
                        ("file://relative/path.png", "local path")):
        expect_error(http.post("/v1/chat/completions", json=with_image(url)), 400, needle)
    still_serves(http)


def test_image_layout_errors(http: httpx.Client) -> None:
    url = data_url(png_bytes(2))
    expect_error(http.post("/v1/chat/completions", json=with_image(url, detail="high")), 400,
                 "auto", "messages.0.content.0.image_url.detail")
    assistant = {"model": BASE_NAME, "messages": [
        {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": url}}]},
        {"role": "user", "content": "and?"}]}
    expect_error(http.post("/v1/chat/completions", json=assistant), 400, "only allowed in user")
    many = chat([{"type": "image_url", "image_url": {"url": url}}] * 9)
    expect_error(http.post("/v1/chat/completions", json=many), 400, "limit is 8")
    still_serves(http)


def test_unknown_models(http: httpx.Client) -> None:
    expect_error(http.post("/v1/chat/completions", json={**chat("hi"), "model": "nope"}), 404,
                 "'nope' does not exist", "model")
    expect_error(http.post("/v1/completions", json={"model": f"{BASE_NAME}:nope", "prompt": "x"}),
                 404, "does not exist", "model")
    expect_error(http.post("/v1/chat/completions", json={**chat("hi"), "model": f"{BASE_NAME}:"}),
                 400, "names no adapter", "model")
    still_serves(http)


def malformed_adapters(root: Path, good: Path) -> dict[str, Path]:
    cases = {name: root / name for name in ("config only", "bad json", "nan weights", "no dir")}
    config = (good / "adapter_config.json").read_text()
    cases["config only"].mkdir()
    (cases["config only"] / "adapter_config.json").write_text(config)
    cases["bad json"].mkdir()
    (cases["bad json"] / "adapter_config.json").write_text("{not json")
    (cases["bad json"] / "adapter_model.safetensors").write_bytes(
        (good / "adapter_model.safetensors").read_bytes())
    from safetensors.torch import load_file, save_file

    cases["nan weights"].mkdir()
    (cases["nan weights"] / "adapter_config.json").write_text(config)
    tensors = load_file(str(good / "adapter_model.safetensors"))
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] * float("nan")
    save_file(tensors, str(cases["nan weights"] / "adapter_model.safetensors"))
    return cases


def test_malformed_adapter_directories_on_load(http: httpx.Client, served: Served,
                                               tmp_path: Path) -> None:
    before = [m["id"] for m in http.get("/v1/models").json()["data"]]
    for name, path in malformed_adapters(tmp_path, served.adapters["spare"]).items():
        body = {"lora_name": f"bad-{name.replace(' ', '-')}", "lora_path": str(path)}
        response = http.post("/v1/load_lora_adapter", json=body)
        expect_error(response, 400, "adapter")
    assert [m["id"] for m in http.get("/v1/models").json()["data"]] == before
    expect_error(http.post("/v1/load_lora_adapter", json={"lora_name": "x:y", "lora_path": "/"}),
                 400, "reserved", "lora_name")
    still_serves(http)


def test_oversize_body_and_prompt(http: httpx.Client) -> None:
    huge = chat("x" * (MAX_BODY_BYTES + 10))
    expect_error(http.post("/v1/chat/completions", json=huge), 413, "exceeds the limit")
    long_prompt = http.post("/v1/completions", json={"model": BASE_NAME, "prompt": "word " * 300})
    expect_error(long_prompt, 400, f"at most {MAX_PROMPT_TOKENS}")
    beyond_context = http.post("/v1/completions",
                               json={"model": BASE_NAME, "prompt": "word " * 3000})
    expect_error(beyond_context, 400, "tokens")
    still_serves(http)


INVALID = [
    ({"temperature": -1}, "temperature"), ({"temperature": 5}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"max_tokens": 0}, "max_tokens"), ({"top_k": -2}, "top_k"),
    ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"), ({"top_logprobs": 2}, "top_logprobs"),
    ({"stop": 7}, "stop"), ({"seed": "abc"}, "seed"), ({"stream_options": {"include_usage": True}},
                                                         "stream_options"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    ({"messages": "hello"}, "messages"), ({"min_tokens": 5, "max_tokens": 2}, None),
    ({"foo": 1}, "foo"),
]
UNSUPPORTED = [
    ({"n": 2}, "n"), ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"logit_bias": {"5": 3.0}}, "logit_bias"), ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"presence_penalty": 1.0}, "presence_penalty"), ({"store": True}, "store"),
]


@pytest.mark.parametrize("extra, param", INVALID + UNSUPPORTED)
def test_invalid_and_unsupported_chat_parameters(http: httpx.Client, extra: dict[str, Any],
                                                 param: str | None) -> None:
    response = http.post("/v1/chat/completions", json={**chat("hi"), **extra})
    expect_error(response, 400, param.split(".")[0] if param else "min_tokens", param)
    still_serves(http)


@pytest.mark.parametrize("extra, param", [({"best_of": 3}, "best_of"), ({"echo": True}, "echo"),
                                          ({"suffix": "end"}, "suffix"), ({"n": 4}, "n"),
                                          ({"prompt": []}, "prompt"), ({"prompt": [10**7]}, None),
                                          ({"prompt": ["a", "b"], "stream": True}, "prompt")])
def test_invalid_and_unsupported_completion_parameters(http: httpx.Client, extra: dict[str, Any],
                                                       param: str | None) -> None:
    body = {"model": BASE_NAME, "prompt": "hello", "max_tokens": 2, **extra}
    expect_error(http.post("/v1/completions", json=body), 400, param or "prompt", param)
    still_serves(http)


@pytest.mark.parametrize("raw, needle", [(b'{"model": "tiny", "messages": [', "malformed json"),
                                         (b"[1, 2, 3]", "json object"), (b"", "missing"),
                                         (b"\xff\xfe\x00garbage", "json")])
def test_malformed_json(http: httpx.Client, raw: bytes, needle: str) -> None:
    response = http.post("/v1/chat/completions", content=raw,
                         headers={"Content-Type": "application/json"})
    expect_error(response, 400, needle)
    still_serves(http)


def test_auth_routes_and_methods(served: Served, http: httpx.Client) -> None:
    body = json.dumps(chat("hi"))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": served.api_key}):
        response = httpx.post(f"{served.url}/v1/chat/completions", content=body,
                              headers={"Content-Type": "application/json", **headers})
        expect_error(response, 401, "api key")
    assert httpx.get(f"{served.url}/health").status_code == 200  # probes stay open
    expect_error(http.get("/v1/nothing-here"), 404, "no route")
    expect_error(http.get("/v1/chat/completions"), 405, "method")
    still_serves(http)


def test_nothing_leaked_after_the_corpus(served: Served, http: httpx.Client) -> None:
    still_serves(http)
    samples = served.metrics()
    assert metric_values(samples, "valora_kv_pages_in_use") == [0.0]
    assert metric_values(samples, "valora_requests_in_flight") == [0.0]
    assert all(v == 0.0 for v in metric_values(samples, "valora_adapter_pins"))
    assert metric_values(samples, "valora_engine_healthy") == [1.0]
