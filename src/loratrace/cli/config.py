"""`loratrace config`: the resolved config as YAML, or (`--keys`) every key with its type, default and docstring."""

from __future__ import annotations

import argparse
import textwrap

import pyarrow as pa

from loratrace.cli.common import emit
from loratrace.config import ConfigError, config_text, load_config
from loratrace.config.keys import describe_keys

KEY_FORMATS = ("text", "table", "csv", "json")


def add_config(sub) -> None:
    config = sub.add_parser("config", help="show the resolved config, or every config key with its meaning",
                            description="Print the config a `loratrace train` with the same --config and overrides "
                                        "would use, as YAML; with --keys, list every key instead.")
    config.add_argument("--config", help="YAML config (default: the embedded default)")
    config.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, as train takes them")
    config.add_argument("--keys", action="store_true",
                        help="list every config key: type, default, allowed values and what it does")
    config.add_argument("--format", choices=KEY_FORMATS, default="text",
                        help="with --keys: text (default, for reading), table, csv or json (JSON Lines)")


def cmd_config(args: argparse.Namespace) -> int:
    if args.format != "text" and not args.keys:
        raise ConfigError("--format goes with --keys; the config itself prints as YAML")
    if not args.keys:
        print(config_text(load_config(args.config, args.overrides)), end="")
        return 0
    rows = describe_keys()
    if args.format != "text":
        emit(pa.Table.from_pylist(rows), args.format, None)
        return 0
    for row in rows:
        allowed = f"   {row['allowed']}" if row["allowed"] else ""
        default = row['default'] or '""'  # an empty string default shows as ""
        print(f"{row['key']}  ({row['type']}, default {default}){allowed}")
        print(textwrap.fill(row["doc"], width=100, initial_indent="    ", subsequent_indent="    "))
    return 0
