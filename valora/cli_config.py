"""Derive command-line flags from the engine config dataclasses (one source of truth)."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
import re
import typing
from typing import Any, get_args, get_origin

from valora.config import (
    CacheConfig,
    ImageConfig,
    LoRAConfig,
    ModelConfig,
    OrchestratorConfig,
    SchedulerConfig,
)

SECTIONS = (ModelConfig, CacheConfig, SchedulerConfig, LoRAConfig, ImageConfig, OrchestratorConfig)


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def _parse_optional_bool(text: str) -> bool | None:
    """A boolean, or ``auto`` for ``None`` (the field decides by itself)."""
    return None if text.lower() == "auto" else _parse_bool(text)


def _flag_type(annotation: Any) -> tuple[Any, list[Any] | None]:
    """Map a field annotation to an argparse ``type`` and optional ``choices``."""
    origin = get_origin(annotation)
    args = [a for a in get_args(annotation) if a is not type(None)]
    if origin is typing.Literal:
        return str, list(args)
    if origin is not None and args == [bool]:  # bool | None: None is "auto"
        return _parse_optional_bool, None
    if origin is not None and args:  # Optional[X] / X | None
        return _flag_type(args[0])
    if annotation is bool:
        return _parse_bool, None
    if annotation in (int, float, str):
        return annotation, None
    return str, None


@functools.cache
def field_help(section: type) -> dict[str, str]:
    """Each field's description from ``section``'s docstring, whose convention is a field name in
    double backticks, a colon, then text: the first sentence, markup dropped — so ``--help`` and
    the config docs never disagree."""
    flat = " ".join((inspect.getdoc(section) or "").split())
    found = {}
    for field in dataclasses.fields(section):
        match = re.search(rf"``{field.name}``(?:\s*/\s*``\w+``)*\s*(?:\([^)]*\))?:\s*"
                          r"(.+?)(?<!e\.g)(?<!i\.e)\.(?:\s|$)", flat)
        if match:
            found[field.name] = match.group(1).replace("``", "").replace("%", "%%")
    return found


def add_engine_flags(parser: argparse.ArgumentParser, *, skip: tuple[str, ...] = ()) -> None:
    """Add ``--field-name`` for every field of every config section (defaults from the dataclass,
    help from its docstring: ``field_help``)."""
    for section in SECTIONS:
        group = parser.add_argument_group(section.__name__)
        hints = typing.get_type_hints(section)
        described = field_help(section)
        for field in dataclasses.fields(section):
            if field.name in skip:
                continue
            flag_type, choices = _flag_type(hints[field.name])
            default = field.default if field.default is not dataclasses.MISSING else None
            shown = "auto" if flag_type is _parse_optional_bool and default is None else default
            group.add_argument(
                f"--{field.name.replace('_', '-')}",
                dest=field.name,
                type=flag_type,
                choices=choices,
                default=default,
                help=f"{described.get(field.name, '')} (default: {shown})".lstrip(),
            )
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)"
    )


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed flags that belong to the engine config, as ``EngineConfig.create`` kwargs."""
    names = {f.name for section in SECTIONS for f in dataclasses.fields(section)} | {"device"}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}



def parse_lora_modules(items: list[str]) -> dict[str, str]:
    """``--lora-modules`` items as ``{name: path}``; a repeated name keeps the later path.

    An item is ``NAME=PATH`` or, as vLLM also accepts, a JSON object with ``name`` and ``path``
    (other keys, e.g. ``base_model_name``, are ignored). A malformed item exits with a usage
    message.
    """
    modules: dict[str, str] = {}
    for item in items:
        name, path = _parse_lora_module(item)
        modules[name] = path
    return modules


def _parse_lora_module(item: str) -> tuple[str, str]:
    usage = f"valora: --lora-modules expects NAME=PATH or {{\"name\": ..., \"path\": ...}}, got {item!r}"
    if item.lstrip().startswith("{"):
        try:
            entry = json.loads(item)
        except json.JSONDecodeError:
            raise SystemExit(usage) from None
        name, path = (entry.get("name"), entry.get("path")) if isinstance(entry, dict) else ("", "")
    else:
        name, _, path = item.partition("=")
    if not isinstance(name, str) or not isinstance(path, str) or not name.strip() \
            or not path.strip():
        raise SystemExit(usage)
    return name.strip(), path.strip()
