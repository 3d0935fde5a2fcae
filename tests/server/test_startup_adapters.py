"""Start-up adapters of ``valora serve``: the default model's bundled adapters (over a fake assets
directory), ``--lora-modules``, and pinning — start-up adapters stay listed and servable through
any runtime loads and unloads until they are explicitly unloaded."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from server_helpers import BASE_NAME, ThreadServer

import valora.assets
from valora import LLM, SamplingParams
from valora.engine.inputs import GenerateRequest
from valora.server.adapters import register_startup_adapters
from valora.server.cli import main, startup_adapters
from valora.server.settings import ServerSettings
from valora.testing.checkpoints import build_tiny_adapter

PROMPT = "USER: name a colour. ASSISTANT:"
GREEDY = {"temperature": 0.0, "max_tokens": 5}


def _fake_bundle(root: Path, names: tuple[str, ...], base: Path | None = None) -> Path:
    """An assets ``adapters/`` directory: real tiny adapters for ``base``, else config stubs."""
    for seed, name in enumerate(names):
        if base is not None:
            build_tiny_adapter(base, root / name, 4, seed=seed, std=0.2)
        else:
            (root / name).mkdir(parents=True)
            (root / name / valora.assets.ADAPTER_CONFIG_FILE).write_text("{}")
    return root


def test_bundled_adapters_only_with_the_default_model(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = _fake_bundle(tmp_path, ("alpha", "beta"))
    monkeypatch.setattr(valora.assets, "default_adapters_dir", lambda: bundle)
    alpha, beta = str(bundle / "alpha"), str(bundle / "beta")
    assert startup_adapters("default", []) == {"alpha": alpha, "beta": beta}
    # --lora-modules add adapters and replace a bundled one of the same name
    assert startup_adapters("default", ["beta=/mine", "gamma=/x"]) == {
        "alpha": alpha, "beta": "/mine", "gamma": "/x"}
    assert startup_adapters("default", ["gamma=/x"], default_adapters=False) == {"gamma": "/x"}
    assert startup_adapters("/models/llava", ["gamma=/x"]) == {"gamma": "/x"}


def test_serve_with_no_model_lists_and_serves_bundled_adapters(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = _fake_bundle(tmp_path / "adapters", ("digits", "scenes"),
                          base=valora.assets.default_model_path())
    monkeypatch.setattr(valora.assets, "default_adapters_dir", lambda: bundle)
    seen: dict[str, Any] = {}

    def run_in_process(app: Any, **_: Any) -> None:  # instead of binding a port
        from fastapi.testclient import TestClient

        with TestClient(app) as http:
            seen["models"] = http.get("/v1/models").json()["data"]
            seen["answer"] = http.post("/v1/chat/completions", json={
                "model": "scenes", "messages": [{"role": "user", "content": "hi"}], **GREEDY})

    monkeypatch.setattr(uvicorn, "run", run_in_process)
    assert main(["--device", "cpu", "--dtype", "float32"]) == 0
    cards = {card["id"]: card for card in seen["models"]}
    assert list(cards) == ["default", "digits", "scenes"]
    for name in ("digits", "scenes"):
        assert cards[name]["parent"] == "default" and cards[name]["pinned"] is True
        assert cards[name]["root"] == str(bundle / name)
    assert seen["answer"].status_code == 200, seen["answer"].text


def _complete(http: httpx.Client, model: str) -> httpx.Response:
    return http.post("/v1/completions", json={"model": model, "prompt": PROMPT, **GREEDY})


def test_start_up_adapters_stay_pinned_through_runtime_churn(
        start_thread_server: Callable[..., ThreadServer], tiny_adapters: dict[str, Path],
        reference_llm: LLM, tmp_path: Path) -> None:
    server = start_thread_server(ServerSettings(served_model_name=BASE_NAME,
                                                enable_lora_loading=True))
    pinned_dir = shutil.copytree(tiny_adapters["r4"], tmp_path / "r4")
    register_startup_adapters(server.engine, {"r4": str(pinned_dir)}, BASE_NAME)
    shutil.rmtree(pinned_dir)  # new files in its place: a re-read would fail its digest check
    shutil.copytree(tiny_adapters["r16"], pinned_dir)
    # more runtime adapters than host-cache entries (4) and device slots (2)
    runtime = {f"dyn{i}": tiny_adapters["spare" if i % 2 else "r16"] for i in range(6)}
    with httpx.Client(base_url=server.url, timeout=120.0) as http:
        for name, path in runtime.items():
            loaded = http.post("/v1/load_lora_adapter",
                               json={"lora_name": name, "lora_path": str(path),
                                     "pinned": name == "dyn0"})
            assert loaded.status_code == 200, loaded.text
            assert _complete(http, name).status_code == 200
        cards = {card["id"]: card for card in http.get("/v1/models").json()["data"]}
        assert cards["r4"]["pinned"] is True and cards["r4"]["residency"] in ("device", "cpu")
        assert [n for n in runtime if cards[n]["pinned"]] == ["dyn0"]
        for name in runtime:
            assert http.post("/v1/unload_lora_adapter", json={"lora_name": name}).status_code == 200
        answer = _complete(http, "r4")
        assert answer.status_code == 200, answer.text
        params = SamplingParams(max_tokens=5, temperature=0.0)
        expected = reference_llm.generate(
            [GenerateRequest(prompt=PROMPT, adapter="r4", sampling_params=params)])[0].text
        assert answer.json()["choices"][0]["text"] == expected, answer.json()
        server.engine.submit(lambda e: e.parts.adapters.check_invariants()).result()
        # an explicit unload still removes a pinned adapter
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "r4"}).status_code == 200
        assert [c["id"] for c in http.get("/v1/models").json()["data"]] == [BASE_NAME]
        assert _complete(http, "r4").status_code == 404


def test_start_up_adapter_names_are_checked(
        start_thread_server: Callable[..., ThreadServer], tiny_adapters: dict[str, Path]) -> None:
    server = start_thread_server()
    for name in (BASE_NAME, "a:b"):
        with pytest.raises(ValueError, match="clashes with the base model name"):
            register_startup_adapters(server.engine, {name: str(tiny_adapters["r4"])}, BASE_NAME)
