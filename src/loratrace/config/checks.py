"""What a config may hold: the allowed values of choice fields, the bounds of every numeric field (finite, in
range), names that become path components, and the cross-field rules. One line naming the key, exit 2."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from loratrace.data.datasets import REGISTRY  # the data-set names a config may name (no torch)
from loratrace.errors import ConfigError

CHOICES = {
    "model.tiny_arch": ("llama", "qwen2"),
    "model.tiny_shape": ("none", "qwen2.5-0.5b"),  # model.SHAPES
    "model.dtype": ("float32", "bfloat16", "float16"),
    "training.schedule": ("constant", "cosine"),
    "eval.scoring": ("label", "text"),
    "checkpoint.tail": ("full", "weights"),
    "training.precision": ("32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true"),
    "logging.swanlab_mode": ("offline", "local", "cloud", "disabled"),
    "logging.wandb_mode": ("offline", "online"),
    "logging.progress": ("auto", "bar", "lines", "none"),
}


@dataclass(frozen=True)
class Bounds:
    """The values a numeric field may take: finite, between `low` and `high` (each end closed unless marked open)."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"


COUNT = Bounds(1, 10**9)  # a count of steps, rows or items: past 10^9 it is a typo, and it must fit an int64 column
SEED = Bounds(0, 2**32 - 1)  # numpy's seed range; Lightning's seed_everything refuses anything outside it too
BOUNDS = {
    "model.tiny_seed": SEED,
    "model.tiny_hidden_size": Bounds(4, 65536),
    "model.tiny_layers": Bounds(1, 1024),
    "lora.r": Bounds(1, 65536),
    "lora.alpha": Bounds(1, 65536),
    "lora.dropout": Bounds(0, 1, high_open=True),
    "data.max_length": Bounds(8, 10**7),
    "data.limit": COUNT,
    "data.num_workers": Bounds(0, 1024),
    "training.batch_size": Bounds(1, 2**20),
    "training.max_steps": COUNT,
    "training.stage1_steps": Bounds(0, 10**9),
    # AdamW moves each weight by about lr a step: past 1000 (a sweep's "absurd" rate) a rate is a typo or an overflow.
    "training.learning_rate_stage1": Bounds(0, 1000, low_open=True),
    "training.learning_rate_stage2": Bounds(0, 1000, low_open=True),
    "training.accumulate_grad_batches": Bounds(1, 2**16),
    "training.warmup_steps": Bounds(0, 10**9),
    "training.weight_decay": Bounds(0, 100),  # AdamW shrinks by lr x weight_decay each step
    "training.max_grad_norm": Bounds(0, 1e9),
    "training.seed": SEED,
    "training.devices": Bounds(1, 1024),
    "training.num_nodes": Bounds(1, 100_000),
    "training.log_every_n_steps": COUNT,
    "checkpoint.stage1_every_n_steps": Bounds(0, 10**9),
    "checkpoint.stage2_every_n_steps": COUNT,
    "checkpoint.full_every": COUNT,
    "tracking.flush_every_steps": COUNT,
    "logging.progress_every_n_steps": COUNT,
    "eval.limit": COUNT,
    "eval.batch_size": Bounds(1, 2**20),
}
"""Every numeric field's bounds (a field that may be null is checked when set)."""


NAME_PARTS = ("method", "data.train_split", "eval.split")
"""Values that become one component of a path: the run folder's name (`<dataset>_<method>_<time>`), a split's file
name (`<split>.jsonl`). One that could climb out of its folder, or name no file at all, is refused."""


def _path_component_problem(value: str) -> str | None:
    if not value.strip():
        return "it is empty"
    if any(separator in value for separator in ("/", "\\", "\0")):
        return "it holds a path separator"
    if value in (".", ".."):
        return f"it is {value!r}"
    return None


def _shown(value: float) -> str:
    """A number for an error line: an integer of hundreds of digits is cut, so the line stays one line of text."""
    text = str(value)
    return text if len(text) <= 30 else f"{text[:12]}...({len(text)} digits)"


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _value(cfg, key: str) -> Any:
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def validate(cfg) -> None:
    t = cfg.training
    for key, allowed in CHOICES.items():
        value = _value(cfg, key)
        _require(value in allowed, f"{key}: {value!r} is not one of {', '.join(allowed)}")
    for key, bounds in BOUNDS.items():
        value = _value(cfg, key)
        if value is not None:
            _require(isinstance(value, int) or math.isfinite(value), f"{key} must be a finite number, got {value}")
            _require(value in bounds, f"{key} must be in {bounds}, got {_shown(value)}")
    for key in NAME_PARTS:
        problem = _path_component_problem(_value(cfg, key))
        _require(problem is None, f"{key}: {_value(cfg, key)!r} cannot name a folder or file ({problem})")
    _require(cfg.data.dataset in REGISTRY,
             f"data.dataset: unknown data set {cfg.data.dataset!r}; known: {', '.join(REGISTRY)}")
    share = t.max_steps * type(t).stage1_steps // type(t).max_steps  # the seed's 75 of 125
    _require(t.stage1_steps <= t.max_steps,
             f"training.stage1_steps must be between 0 and training.max_steps ({t.max_steps}), got {t.stage1_steps}: "
             f"set training.stage1_steps={share} (the default's share) or less")
    _validate_labels(cfg.run)
    _require(bool(cfg.lora.target_modules), "lora.target_modules must name at least one module")
    _require(cfg.model.tiny_hidden_size % 4 == 0, "model.tiny_hidden_size must be a multiple of 4")


def _validate_labels(run) -> None:
    """run.name and run.tags are shown in one-line tables and a tag list is stored comma-joined in the runs view."""
    _require(len(run.name) <= 100 and run.name.isprintable(),
             f"run.name must be one line of at most 100 printable characters, got {_shown_text(run.name)}")
    for tag in run.tags:
        _require(0 < len(tag) <= 64 and tag.isprintable() and "," not in tag and tag == tag.strip(),
                 f"run.tags: {_shown_text(tag)} must be 1 to 64 printable characters, no comma or edge spaces")


def _shown_text(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:40] + "...")

