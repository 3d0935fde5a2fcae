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


def test_every_engine_flag_is_described_from_its_config_docstring() -> None:
    """``--help`` carries each config field's first docstring sentence and its default, so the
    flags and the config documentation cannot drift apart."""
    import dataclasses

    from valora.cli_config import SECTIONS, field_help

    for section in SECTIONS:
        described = field_help(section)
        missing = [f.name for f in dataclasses.fields(section) if not described.get(f.name)]
        assert not missing, f"{section.__name__} fields without a docstring entry: {missing}"
    parser = build_parser()
    generate = next(a for a in parser._subparsers._group_actions[0].choices.items()
                    if a[0] == "generate")[1]
    helps = {a.dest: a.help for a in generate._actions}
    assert helps["overlap_max_tokens"].startswith("on CUDA, steps of at most this many tokens")
    assert helps["overlap_max_tokens"].endswith("(default: 32)")
    assert helps["dtype"].startswith('"auto" (bfloat16 on CUDA')


def test_few_adapter_flags_parse_and_validate() -> None:
    """``--few-adapter-buckets`` is a comma list of bucket sizes, ``--few-adapter-max`` a count;
    a malformed list or a negative count is a clear error."""
    from valora.config import LoRAConfig
    from valora.errors import InvalidRequestError

    args = build_parser().parse_args(["generate", "hi", "--few-adapter-buckets", "16, 8,16",
                                      "--few-adapter-max", "4"])
    kwargs = engine_kwargs(args)
    config = LoRAConfig(few_adapter_buckets=kwargs["few_adapter_buckets"],
                        few_adapter_max=kwargs["few_adapter_max"])
    assert config.few_adapter_bucket_sizes() == (8, 16) and config.few_adapter_max == 4
    assert LoRAConfig(few_adapter_buckets="").few_adapter_bucket_sizes() == ()
    for bad in ("8,x", "0", "-8"):
        with pytest.raises(InvalidRequestError, match="few_adapter_buckets"):
            LoRAConfig(few_adapter_buckets=bad)
    with pytest.raises(InvalidRequestError, match="few_adapter_max"):
        LoRAConfig(few_adapter_max=-1)


def test_async_scheduling_flag_takes_auto() -> None:
    """``--async-scheduling`` is a boolean or ``auto`` (the config's ``None``: on for CUDA
    engines); ``--help`` shows ``auto`` as its default."""
    parse = build_parser().parse_args
    assert "async_scheduling" not in engine_kwargs(parse(["generate", "hi"]))
    assert "async_scheduling" not in engine_kwargs(
        parse(["generate", "hi", "--async-scheduling", "AUTO"]))
    assert engine_kwargs(parse(["generate", "hi", "--async-scheduling", "off"])
                         )["async_scheduling"] is False
    assert engine_kwargs(parse(["generate", "hi", "--async-scheduling", "true"])
                         )["async_scheduling"] is True
    with pytest.raises(SystemExit):
        parse(["generate", "hi", "--async-scheduling", "sometimes"])
    generate = next(a for a in build_parser()._subparsers._group_actions[0].choices.items()
                    if a[0] == "generate")[1]
    helps = {a.dest: a.help for a in generate._actions}
    assert helps["async_scheduling"].endswith("(default: auto)")
