"""Command-line flags for a benchmark's frozen config dataclass: one `--field-name` per field.

Standard library only, so that a benchmark can parse its arguments (and choose its JAX
platform) before JAX is imported.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

_KINDS = {"int": int, "float": float, "str": str}


def add_config_flags(
    parser: argparse.ArgumentParser,
    config_cls: type,
    choices: Mapping[str, Sequence[Any]] | None = None,
) -> None:
    """Add `--field-name` for every field of `config_cls` (unset by default).

    The kind comes from the field's annotation (`int`, `float`, `str`, `bool`, or one of
    them `| None`); `bool` fields become switches. `choices` restricts named fields.
    """
    for f in dataclasses.fields(config_cls):
        flag = f"--{f.name.replace('_', '-')}"
        annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        kind = annotation.split("|")[0].strip()
        if kind == "bool":
            parser.add_argument(flag, action="store_true", default=None)
        elif kind in _KINDS:
            parser.add_argument(
                flag, type=_KINDS[kind], choices=(choices or {}).get(f.name), default=None
            )
        else:
            raise TypeError(f"no command-line flag for {config_cls.__name__}.{f.name}: {f.type}")


def config_from_args(
    args: argparse.Namespace, config_cls: type, preset: Mapping[str, Any] | None = None
) -> Any:
    """`config_cls` from its defaults, then `preset`, then the flags that were given."""
    values = {f.name: f.default for f in dataclasses.fields(config_cls)}
    values.update(preset or {})
    values.update({k: v for k, v in vars(args).items() if k in values and v is not None})
    return config_cls(**values)


def json_or_table_main(
    argv: Sequence[str] | None,
    *,
    description: str,
    config_cls: type,
    quick: Mapping[str, Any],
    run: Callable[[Any], dict[str, Any]],
    table: Callable[[dict[str, Any]], str],
) -> dict[str, Any]:
    """The command line of a benchmark with `--json`, `--quick` and one flag per config
    field: runs `run(config)` and prints one JSON object or `table(result)`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes")
    add_config_flags(parser, config_cls)
    args = parser.parse_args(argv)
    result = run(config_from_args(args, config_cls, quick if args.quick else None))
    print(json.dumps(result) if args.json else table(result))
    return result
