"""The ``valora`` command line: delegation to sub-command parsers and flags derived from config."""

from __future__ import annotations

import pytest

from valora.cli import _split_delegated, build_parser
from valora.cli_config import engine_kwargs


def test_delegated_commands_keep_their_options() -> None:
    assert _split_delegated(["serve", "--port", "9"]) == ([], "serve", ["--port", "9"])
    assert _split_delegated(["--log-level", "INFO", "adapters", "build", "x.toml"]) == (
        ["--log-level", "INFO"], "adapters", ["build", "x.toml"])
    assert _split_delegated(["generate", "hi"]) is None


def test_generate_flags_come_from_the_config() -> None:
    args = build_parser().parse_args(["generate", "hello", "--page-size", "32", "--max-loras", "3",
                                      "--enable-prefix-caching", "false", "--dtype", "float32"])
    kwargs = engine_kwargs(args)
    assert kwargs["page_size"] == 32 and kwargs["max_loras"] == 3
    assert kwargs["enable_prefix_caching"] is False and kwargs["dtype"] == "float32"


def test_bad_choice_is_rejected() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--dtype", "float8"])
