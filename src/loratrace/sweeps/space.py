"""The search space of a sweep: `--param 'key=loguniform(a,b)'` over any config key, checked before any trial runs.

    loguniform(1e-5,1e-3)   a float, log-uniform between a and b (0 < a < b)
    uniform(0.0,0.1)        a float, uniform between a and b
    int(50,100,step=25)     an integer between a and b inclusive, every `step` (default 1)
    choice(4,8,16)          one of the values, each read as the key's type (choice(constant,cosine), choice(null,100))

    space = parse_params(["lora.r=choice(4,8,16)"], base)     # SearchSpace; a bad one raises ConfigError
    values = space.suggest(trial)                             # {"lora.r": 8}: sampled by Optuna's trial
    cfg = space.config(base, values)                          # the trial's Config, validated
"""

from __future__ import annotations

import re
import types
import typing
from dataclasses import dataclass
from typing import Any

import yaml

from loratrace.config import Config, config_from_flat, known_keys
from loratrace.errors import ConfigError
from loratrace.overrides import coerce, flatten_keys

SYNTAX = "key=loguniform(a,b), uniform(a,b), int(a,b[,step=s]) or choice(x,y,...)"
PATTERN = re.compile(r"\s*([A-Za-z0-9_.]+)\s*=\s*(loguniform|uniform|int|choice)\s*\((.*)\)\s*")


@dataclass(frozen=True)
class Param:
    text: str  # as the user wrote it: `lora.r=choice(4,8,16)`
    key: str
    kind: str  # loguniform, uniform, int, choice
    low: float | int | None = None
    high: float | int | None = None
    step: int = 1
    choices: tuple = ()

    def bounds(self) -> list:
        """The values that must each make a valid config: both ends of a range, every choice."""
        return list(self.choices) if self.kind == "choice" else [self.low, self.high]

    def suggest(self, trial) -> Any:
        if self.kind == "loguniform":
            return trial.suggest_float(self.key, self.low, self.high, log=True)
        if self.kind == "uniform":
            return trial.suggest_float(self.key, self.low, self.high)
        if self.kind == "int":
            return trial.suggest_int(self.key, self.low, self.high, step=self.step)
        return trial.suggest_categorical(self.key, list(self.choices))


@dataclass(frozen=True)
class SearchSpace:
    params: tuple[Param, ...]

    def suggest(self, trial) -> dict[str, Any]:
        return {p.key: p.suggest(trial) for p in self.params}

    def config(self, base: Config, values: dict[str, Any]) -> Config:
        """`base` with the sampled `values` (dotted keys), validated like any config."""
        return config_from_flat({**flatten_keys(base.to_dict()), **values})

    @property
    def texts(self) -> list[str]:
        return [p.text for p in self.params]


def parse_param(text: str) -> Param:
    """One `--param`; a malformed one raises ConfigError naming it (the key's existence is checked by parse_params)."""
    match = PATTERN.fullmatch(text)
    if not match:
        raise ConfigError(f"--param {text!r}: expected {SYNTAX}")
    key, kind, inner = match.groups()
    if kind == "choice":
        try:
            values = yaml.safe_load(f"[{inner}]")
        except yaml.YAMLError:
            values = None
        if not values:
            raise ConfigError(f"--param {text!r}: choice() needs at least one value, e.g. choice(4,8,16)")
        if len({repr(v) for v in values}) != len(values):
            raise ConfigError(f"--param {text!r}: choice() lists a value twice")
        return Param(text, key, kind, choices=tuple(values))
    parts = [p.strip() for p in inner.split(",")]
    step = 1
    if kind == "int" and len(parts) == 3 and parts[2].replace(" ", "").startswith("step="):
        step_text = parts.pop().split("=", 1)[1].strip()
        step = _number(text, step_text, int)
        if step < 1:
            raise ConfigError(f"--param {text!r}: step must be at least 1")
    if len(parts) != 2:
        raise ConfigError(f"--param {text!r}: {kind}() takes two bounds" + (", then step=s" if kind == "int" else ""))
    low, high = (_number(text, p, int if kind == "int" else float) for p in parts)
    if not low < high:
        raise ConfigError(f"--param {text!r}: the lower bound must be below the upper")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"--param {text!r}: loguniform() needs bounds above 0")
    if kind == "int" and (high - low) % step:
        raise ConfigError(f"--param {text!r}: the range {low}..{high} is not a whole number of steps of {step}")
    return Param(text, key, kind, low, high, step)


def _number(text: str, raw: str, kind: type) -> float | int:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"--param {text!r}: {raw!r} is not a number") from None
    if kind is int:
        if not value.is_integer():
            raise ConfigError(f"--param {text!r}: int() bounds and step are integers, not {raw}")
        return int(value)
    return value


def parse_params(texts: list[str], base: Config) -> SearchSpace:
    """Every `--param`, checked against the config schema before any trial: the key exists, the kind of range fits
    its type, and each end of the range (each choice) gives a valid config on top of `base`."""
    if not texts:
        raise ConfigError(f"a sweep needs at least one --param ({SYNTAX})")
    keys = known_keys()
    flat = flatten_keys(base.to_dict())
    params = []
    for text in texts:
        param = parse_param(text)
        if param.key not in keys:
            config_from_flat({param.key: None})  # raises the schema's one line: unknown key (did you mean ...?)
        if any(p.key == param.key for p in params):
            raise ConfigError(f"--param {text!r}: {param.key} is given twice")
        param = _typed(param, keys[param.key])
        for value in param.bounds():
            try:
                config_from_flat({**flat, param.key: value})
            except ConfigError as exc:
                raise ConfigError(f"--param {text!r}: {exc}") from None
        params.append(param)
    if base.training.devices > 1 or any(p.key == "training.devices" for p in params):
        raise ConfigError("a sweep trains each trial on one device (training.devices=1); run multi-device trials "
                          "with loratrace train")
    return SearchSpace(tuple(params))


def _typed(param: Param, hint: Any) -> Param:
    """A range's kind against the key's type; choices read as the key's type (a list key's as comma-joined text,
    since Optuna's choices are scalars)."""
    base = hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # `int | None` -> int
        base = next(a for a in typing.get_args(hint) if a is not type(None))
    if param.kind == "choice":
        typed = []
        for value in param.choices:
            try:
                value = coerce(param.key, value, hint)
            except ConfigError as exc:
                raise ConfigError(f"--param {param.text!r}: {exc}") from None
            typed.append(",".join(map(str, value)) if isinstance(value, list) else value)
        return Param(param.text, param.key, param.kind, choices=tuple(typed))
    if param.kind in ("loguniform", "uniform") and base is not float:
        raise ConfigError(f"--param {param.text!r}: {param.key} is not a number with decimals; "
                          + ("use int(a,b)" if base is int else "use choice(...)"))
    if param.kind == "int" and base not in (int, float):
        raise ConfigError(f"--param {param.text!r}: {param.key} is not a number; use choice(...)")
    return param
