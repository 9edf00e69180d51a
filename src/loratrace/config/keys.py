"""Every config key described from the schema itself: dotted name, type, default, allowed values and the docstring
written under its field in config/schema.py. `loratrace config --keys` prints it; nothing here is a second copy to keep.

    rows = describe_keys()   # [{"key": "training.max_steps", "type": "int", "default": "125", ...}, ...]
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import textwrap
import typing
from typing import Any

from loratrace.config.checks import BOUNDS, CHOICES
from loratrace.config.schema import Config


def field_docs(cls: type) -> dict[str, str]:
    """A dataclass's attribute docstrings (the string literal right under a field), whitespace folded to one line."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def type_name(hint: Any) -> str:
    """`int`, `str`, `int | None`, `list[str]`: as the schema annotates it."""
    if isinstance(hint, type) and not typing.get_args(hint):
        return hint.__name__
    return str(hint).replace("typing.", "")


def default_text(value: Any) -> str:
    """A default as it is typed in an override: strings bare, the rest as YAML reads them (null, true, [a, b])."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return ",".join(str(item) for item in value)
    return json.dumps(value)


def describe_keys(cls: type = Config, prefix: str = "") -> list[dict[str, str]]:
    """One row per dotted key, in the schema's order: key, type, default, allowed (choices or bounds), doc."""
    rows: list[dict[str, str]] = []
    hints, defaults, docs = typing.get_type_hints(cls), cls(), field_docs(cls)
    for f in dataclasses.fields(cls):
        key, hint = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(hint):
            rows += describe_keys(hint, f"{key}.")
            continue
        allowed = ", ".join(CHOICES[key]) if key in CHOICES else str(BOUNDS[key]) if key in BOUNDS else ""
        rows.append({"key": key, "type": type_name(hint), "default": default_text(getattr(defaults, f.name)),
                     "allowed": allowed, "doc": docs.get(f.name, "")})
    return rows
