"""``valora.assets.default_adapter_paths``: which bundled adapter directories are found, in what
order, over a fake assets directory (the real bundled adapters need not exist)."""

from __future__ import annotations

from pathlib import Path

import pytest

import valora.assets
from valora.assets import ADAPTER_CONFIG_FILE, default_adapter_paths


def _adapter_dir(root: Path, name: str) -> Path:
    directory = root / name
    directory.mkdir(parents=True)
    (directory / ADAPTER_CONFIG_FILE).write_text("{}")
    return directory


def test_finds_adapter_directories_sorted_by_name(tmp_path: Path) -> None:
    zebra, alpha = _adapter_dir(tmp_path, "zebra"), _adapter_dir(tmp_path, "alpha")
    (tmp_path / "no_config").mkdir()  # a directory without adapter_config.json is not an adapter
    (tmp_path / "manifest.json").write_text("{}")  # nor is a file
    (tmp_path / "file_only").write_text("")
    found = default_adapter_paths(tmp_path)
    assert list(found) == ["alpha", "zebra"]
    assert found == {"alpha": alpha, "zebra": zebra}


def test_missing_or_empty_directory_means_no_adapters(tmp_path: Path) -> None:
    assert default_adapter_paths(tmp_path / "absent") == {}
    assert default_adapter_paths(tmp_path) == {}


def test_default_location_is_the_packaged_adapters_dir(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    assert valora.assets.default_adapters_dir().parent == valora.assets.default_model_path().parent
    for path in default_adapter_paths().values():  # whatever is bundled right now
        assert (path / ADAPTER_CONFIG_FILE).is_file()
    digits = _adapter_dir(tmp_path, "digits")
    monkeypatch.setattr(valora.assets, "default_adapters_dir", lambda: tmp_path)
    assert default_adapter_paths() == {"digits": digits}
