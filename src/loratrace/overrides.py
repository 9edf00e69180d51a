"""Config text to dotted keys and typed values: YAML files, `key=value` overrides, and the seed's "traditional"
nested keys translated as a whole. `config.load_config` puts these together with the typed schema.

    sources = [flatten_keys(read_yaml_file(path)), dict([parse_override("training.stage2.steps=30")])]
    flat = resolve_keys(sources)              # {"training.max_steps": 105, ...}: our keys, later sources winning
"""

from __future__ import annotations

import difflib
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from loratrace.errors import ConfigError

# The seed's "traditional" nested keys -> ours (a key may set several). `training.stage2.steps` is resolved apart: it
# sets max_steps = stage1_steps + those steps, with stage1_steps as finally resolved.
LEGACY_KEYS = {
    "training.per_device_train_batch_size": ("training.batch_size",),
    "training.gradient_accumulation_steps": ("training.accumulate_grad_batches",),
    "training.stage1.steps": ("training.stage1_steps",),
    "training.stage1.learning_rate": ("training.learning_rate_stage1",),
    "training.stage2.learning_rate": ("training.learning_rate_stage2",),
    "training.learning_rate": ("training.learning_rate_stage1", "training.learning_rate_stage2"),
    "training.lr_scheduler_type": ("training.schedule",),
    "training.logging_steps": ("training.log_every_n_steps",),
    "lora.lora_alpha": ("lora.alpha",),
    "lora.lora_dropout": ("lora.dropout",),
    "lora.lora_r": ("lora.r",),
    "data.dataset_name": ("data.dataset",),
    "data.max_seq_length": ("data.max_length",),
    "model.model_name_or_path": ("model.name",),
    "model.name_or_path": ("model.name",),
    "model": ("model.name",),  # `model: Qwen/Qwen2.5-0.5B` at the top level
}
STAGE2_STEPS = "training.stage2.steps"
STAGE1_STEPS = "training.stage1_steps"
_BOTH_RATES = ("training.learning_rate_stage1", "training.learning_rate_stage2")
# What other tools call a setting -> our keys: an unknown key whose last part is one of these is told about them.
ALIASES = {
    "lr": _BOTH_RATES, "learning_rate": _BOTH_RATES, "steps": ("training.max_steps",),
    "epochs": ("training.max_steps",), "num_train_epochs": ("training.max_steps",),
    "bs": ("training.batch_size",), "train_batch_size": ("training.batch_size",),
    "grad_accum": ("training.accumulate_grad_batches",), "gradient_accumulation_steps":
    ("training.accumulate_grad_batches",), "warmup": ("training.warmup_steps",),
    "warmup_ratio": ("training.warmup_steps",), "scheduler": ("training.schedule",),
    "lr_scheduler": ("training.schedule",), "lr_scheduler_type": ("training.schedule",),
    "grad_clip": ("training.max_grad_norm",), "gradient_clip_val": ("training.max_grad_norm",),
    "rank": ("lora.r",), "lora_r": ("lora.r",), "lora_rank": ("lora.r",), "lora_alpha": ("lora.alpha",),
    "lora_dropout": ("lora.dropout",), "model_name": ("model.name",), "model_name_or_path": ("model.name",),
    "dataset_name": ("data.dataset",), "max_seq_length": ("data.max_length",), "seq_len": ("data.max_length",),
    "output_dir": ("runs_dir",),
}


def flatten_keys(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as dotted keys: {'training': {'seed': 1}} -> {'training.seed': 1}."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_keys(value, name + "."))
        else:
            flat[name] = value
    return flat


def coerce(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return coerce(key, value, args[0])
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [coerce(key, v, item) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > sys.float_info.max:
            raise ConfigError(f"{key} must be a finite number, got an integer of {len(str(abs(value)))} digits")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def resolve_keys(sources: list[dict[str, Any]], notice=None, stage1_default: int = 75,
                 stage1_share: tuple[int, int] | None = None) -> dict[str, Any]:
    """Merge flat key mappings (the file, then each override: a later one wins) into our keys, translating the
    traditional script's keys as a whole: within one source our own key beats a legacy key that sets the same thing;
    `training.learning_rate` sets both stages; `training.stage2.steps` sets max_steps from the final stage1_steps
    (unless a later source sets max_steps itself; `stage1_default` when no source sets stage1_steps). One notice
    line per translated key. With `stage1_share`, a stage1_steps given nowhere follows max_steps (`scale_stage1`)."""
    flat: dict[str, Any] = {}
    given_in: dict[str, int] = {}  # key -> index of the source that set it last
    stage2: tuple[int, Any] | None = None
    for index, source in enumerate(sources):
        direct = {k: v for k, v in source.items() if k not in LEGACY_KEYS and k != STAGE2_STEPS}
        for key, value in source.items():
            if key == STAGE2_STEPS:
                stage2 = (index, value)
            elif key in LEGACY_KEYS:
                targets = LEGACY_KEYS[key]
                if notice and key != "model":
                    notice(f"note: legacy key {key} read as {' and '.join(targets)}")
                for target in targets:
                    if target not in direct:
                        flat[target], given_in[target] = value, index
        for key, value in direct.items():
            flat[key], given_in[key] = value, index
    if stage2 is not None:
        index, value = stage2
        steps = coerce(STAGE2_STEPS, value, int)
        if given_in.get("training.max_steps", -1) <= index:
            stage1 = coerce("training.stage1_steps", flat.get("training.stage1_steps", stage1_default),
                             int)
            if given_in.get("training.max_steps") == index and flat["training.max_steps"] != stage1 + steps:
                raise ConfigError(f"training.max_steps ({flat['training.max_steps']}) disagrees with "
                                  f"training.stage1_steps + training.stage2.steps ({stage1} + {steps}); give one")
            flat["training.max_steps"] = stage1 + steps
            flat.setdefault(STAGE1_STEPS, stage1)  # stage 1 as counted: not rescaled from the max_steps it made
            if notice:
                notice(f"note: legacy key {STAGE2_STEPS} read as training.max_steps = {stage1} + {steps}")
    return scale_stage1(flat, stage1_share, notice) if stage1_share else flat


def scale_stage1(flat: dict[str, Any], share: tuple[int, int], notice=None) -> dict[str, Any]:
    """`training.stage1_steps` given nowhere: the stage boundary keeps `share` (the default's stage1 of max steps, the
    seed's 75 of 125) of the run, so `training.max_steps=30` trains 18 + 12 steps. Given anywhere, it is kept."""
    steps = flat.get("training.max_steps")
    if STAGE1_STEPS in flat or not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        return flat
    stage1 = steps * share[0] // share[1]
    if notice and stage1 != share[0]:
        notice(f"note: training.stage1_steps = {stage1} ({share[0]}/{share[1]} of training.max_steps={steps}; "
               f"set training.stage1_steps to choose)")
    return {**flat, STAGE1_STEPS: stage1}


def suggestions(key: str, known: list[str]) -> list[str]:
    """Known keys a mistyped `key` may mean: those of an alias it ends with (`training.lr` -> both learning rates),
    those with the same last part (`batch_size`), else the closest spelling; three at most."""
    leaf = key.rsplit(".", 1)[-1]
    found = list(ALIASES.get(leaf, ()))
    found += [k for k in known if k.rsplit(".", 1)[-1] == leaf]
    found = found or difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    return list(dict.fromkeys(k for k in found if k in known))[:3]


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value (e.g. training.max_steps=20)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def read_yaml_file(path: Path) -> dict[str, Any]:
    """A YAML mapping from `path`; a missing file, bytes that are not UTF-8 or bad YAML are one ConfigError line."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path} line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save it as UTF-8")\
            from None
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None)
        raise ConfigError(f"{path}{where}: not valid YAML" + (f" ({problem})" if problem else "")) from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return tree
