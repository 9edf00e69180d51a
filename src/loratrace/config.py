"""One typed config for a run: YAML in, dotted `key.sub=value` overrides, legacy keys translated, validated.

    cfg = load_config("configs/tiny.yaml", ["training.max_steps=20"])
    save_config(cfg, "runs/x/config.yaml")        # re-runs as is

Every error a user can make here raises `ConfigError` with one line naming the key (and the closest known
key); the CLI turns it into exit code 2 before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loratrace.data.datasets import REGISTRY  # the data-set names a config may name (no torch)
from loratrace.errors import ConfigError
from loratrace.overrides import coerce, flatten_keys, parse_override, read_yaml_file, resolve_keys, suggestions


@dataclass
class ModelConfig:
    name: str = "tiny"
    """Base model: `tiny` (offline preset, see tiny_pretrained), a Hugging Face hub id, or a local folder."""
    tiny_pretrained: bool = True
    """true: the tiny preset is the small Llama shipped with loratrace (hidden 128, 2 layers), pre-trained offline on
    generated facts by `python -m loratrace.sample.pretrain_tiny`, as long as tiny_arch, tiny_seed,
    tiny_hidden_size, tiny_layers and tiny_shape keep their defaults; setting any of them, or false, builds a random
    base of that shape (the seed's behaviour)."""
    tiny_arch: str = "llama"
    """Architecture of a random tiny base: `llama` or `qwen2`."""
    tiny_seed: int = 0
    """Seed of a random tiny base's weights and tokenizer: the same seed gives the same base model."""
    tiny_hidden_size: int = 128
    """Hidden size of a random tiny base (the default is the shipped base's)."""
    tiny_layers: int = 2
    """Decoder layers of a random tiny base."""
    tiny_shape: str = "none"
    """`qwen2.5-0.5b`: a random tiny base with that model's shape and vocabulary size (offline; for benchmarks),
    overriding tiny_arch, tiny_hidden_size and tiny_layers. The tokenizer stays the preset's."""
    dtype: str = "float32"
    """Weights dtype of the loaded base model: float32, bfloat16 or float16."""
    trust_remote_code: bool = False
    """Passed to `from_pretrained` for hub models that ship their own code."""


@dataclass
class LoraConfig:
    r: int = 16
    """LoRA rank (the embedded default's; the hub configs set the seed's own)."""
    alpha: int = 32
    """LoRA scaling numerator (`lora_alpha`)."""
    dropout: float = 0.05
    """Dropout on the LoRA branch."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module names that get adapters."""


@dataclass
class DataConfig:
    dataset: str = "arc-challenge"
    """Registry name: arc-challenge, arc-easy, boolq, piqa, hellaswag, winogrande, openbookqa, siqa."""
    source: str = "sample"
    """`sample` (bundled synthetic ARC-format set), `hub` (Hugging Face hub), or a local path
    (JSONL/Parquet file, folder of `<split>.jsonl|parquet`, or a `save_to_disk` folder). ARC rows may be in the
    hub's layout or the original AI2 JSONL's (`"question": {"stem": ..., "choices": [{"text", "label"}, ...]}`)."""
    train_split: str = "train"
    """Split trained on."""
    max_length: int = 256
    """Longest prompt+answer in tokens; longer prompts are cut from the left, the answer is kept."""
    limit: int | None = None
    """Use only the first N training rows (lines keep their source numbering)."""
    num_workers: int = 0
    """DataLoader worker processes."""


@dataclass
class TrainingConfig:
    batch_size: int = 32
    """Examples per micro-batch per device."""
    max_steps: int = 125
    """Optimizer updates in total (both stages)."""
    stage1_steps: int = 75
    """Updates in stage 1; stage 2 runs the remaining `max_steps - stage1_steps`. Given nowhere (neither the YAML nor
    an override), it keeps the default's share of max_steps: 75/125, so training.max_steps=30 gives 18."""
    learning_rate_stage1: float = 3e-3
    """Peak learning rate of stage 1 (the embedded default's, for the tiny base; the seed's 1e-4 is in the hub
    configs)."""
    learning_rate_stage2: float = 3e-3
    """Peak learning rate of stage 2."""
    accumulate_grad_batches: int = 1
    """Micro-batches per optimizer update."""
    warmup_steps: int = 0
    """Linear warm-up updates at the start of each stage."""
    schedule: str = "constant"
    """Schedule inside each stage after warm-up: `constant` or `cosine` (to 0 at the stage's end)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global L2 norm (0 disables)."""
    precision: str = "32-true"
    """Lightning precision: 32-true, bf16-mixed, bf16-true, 16-mixed."""
    seed: int = 42
    """Seed of data order, LoRA init and dropout."""
    accelerator: str = "auto"
    """Lightning accelerator: auto, cpu, gpu."""
    devices: int = 1
    """Devices (processes) per node; under torchrun or srun, the processes each node starts."""
    num_nodes: int = 1
    """Nodes (machines) the run spans; more than one needs torchrun or srun to start the processes on each."""
    strategy: str = "auto"
    """Lightning strategy: auto, ddp, fsdp (gathers the LoRA tensors and optimizer state into full tensors on rank 0
    at every checkpoint; needs a GPU), or any other Lightning strategy name, passed through."""
    log_every_n_steps: int = 1
    """How often scalars go to TensorBoard/SwanLab."""


@dataclass
class CheckpointConfig:
    stage1_every_n_steps: int = 0
    """Also save a checkpoint every N updates in stage 1 (0: none)."""
    stage2_every_n_steps: int = 1
    """Save a checkpoint every N updates in stage 2 (the seed: every step)."""
    tail: str = "full"
    """Stage-2 checkpoints: `full` (resumable: LoRA weights, optimizer, schedule, loop and RNG state) or `weights`
    (the LoRA weights only, about a third of the bytes: enough for eval, influence and export, not for a resume), with
    a full one at least every `full_every` steps and at the end."""
    full_every: int = 10
    """With tail=weights: a stage-2 checkpoint is full (resumable) when a multiple of this lies between the previous
    stage-2 checkpoint (or stage 1's end) and its step: every multiple when stage2_every_n_steps=1, the first
    checkpoint past each multiple otherwise (stage2_every_n_steps=4 from 75, full_every=10: 83, 91, 103, ... full)."""


@dataclass
class TrackingConfig:
    enabled: bool = False
    """Record every micro-batch in Parquet under tracking/ (`--track-batches`)."""
    flush_every_steps: int = 50
    """Flush buffered rows at least every N updates (also at every checkpoint, the end, and on errors)."""


@dataclass
class EvalConfig:
    every_checkpoint: bool = False
    """Evaluate each checkpoint on `split` as it is written (rank 0, same forward as `loratrace eval`)."""
    split: str = "validation"
    """Held-out split scored."""
    limit: int | None = None
    """Score only the first N rows of the split."""
    batch_size: int = 32
    """Examples per forward pass."""
    scoring: str = "label"
    """`label`: log-likelihood of each choice's letter after the prompt; `text`: of the choice's text, per token."""


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    """Write TensorBoard events under tensorboard_logs/."""
    swanlab: bool = True
    """Write SwanLab files under swanlab_logs/."""
    swanlab_mode: str = "offline"
    """SwanLab mode: offline, local (needs swanlab[dashboard]) or cloud (needs a login)."""
    project: str = "loratrace"
    """Project name: SwanLab's project, MLflow's experiment, W&B's project."""
    mlflow: bool = False
    """Log to MLflow (needs `pip install loratrace[loggers]`): params = the resolved config, metrics per step, the
    final adapter and config.yaml as artifacts."""
    mlflow_tracking_uri: str = ""
    """MLflow tracking URI; empty = a SQLite store `<runs_dir>/mlflow.db` (`mlflow ui --backend-store-uri` on it)."""
    wandb: bool = False
    """Log to Weights & Biases (needs `pip install loratrace[loggers]`), files under the run's wandb/."""
    wandb_mode: str = "offline"
    """W&B mode: offline (`wandb sync` later) or online (needs `wandb login` first)."""
    csv: bool = False
    """Write Lightning's CSVLogger layout under csv_logs/ (metrics.csv, hparams.yaml)."""
    progress: str = "auto"
    """Training progress on stderr: `bar` (a progress bar), `lines` (one line every progress_every_n_steps, for
    logs and SLURM), `none`; `auto`: the bar on a terminal, lines otherwise."""
    progress_every_n_steps: int = 10
    """With progress lines: a line every N updates (and at the last)."""


@dataclass
class RunConfig:
    name: str = ""
    """A short name of the run for `runs`, `compare` and the report (`train --name`); empty: the run id only. Any
    text of one line, at most 100 characters; it is a label, not the folder's name."""
    tags: list[str] = field(default_factory=list)
    """Labels to find the run by (`train --tag T`, `runs --tag T`): each one line, at most 64 characters, no comma."""


@dataclass
class ExportConfig:
    merged_model: bool = True
    """Write final_model/: base + LoRA merged, Hugging Face format, with the tokenizer."""
    adapter: bool = True
    """Write final_adapter/: the PEFT adapter."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    run: RunConfig = field(default_factory=RunConfig)
    runs_dir: str = "runs"
    """Folder that holds the run folders."""
    method: str = "lora"
    """Method name in the run folder's name."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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


def known_keys(cls: type = Config, prefix: str = "") -> dict[str, Any]:
    """Every dotted key of the schema, mapped to its annotated type."""
    keys = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            keys.update(known_keys(hint, f"{prefix}{f.name}."))
        else:
            keys[f"{prefix}{f.name}"] = hint
    return keys


def _unknown(key: str, keys: dict) -> ConfigError:
    close = suggestions(key, list(keys))
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    return ConfigError(f"unknown config key {key}{hint}; `loratrace config --keys` lists them all")


def config_from_flat(flat: dict[str, Any]) -> Config:
    keys = known_keys()
    cfg = Config()
    for key, value in flat.items():
        if key not in keys:
            raise _unknown(key, keys)
        *parents, leaf = key.split(".")
        target = cfg
        for part in parents:
            target = getattr(target, part)
        setattr(target, leaf, coerce(key, value, keys[key]))
    validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = (), notice=None) -> Config:
    """Default config <- YAML file <- `key=value` overrides, validated."""
    notice = notice or (lambda line: print(line, file=sys.stderr))
    sources: list[dict[str, Any]] = []
    if path is not None:
        sources.append(flatten_keys(read_yaml_file(Path(path))))
    sources += [dict([parse_override(text)]) for text in overrides]
    share = (TrainingConfig.stage1_steps, TrainingConfig.max_steps)  # stage1_steps given nowhere keeps this share
    return config_from_flat(resolve_keys(sources, notice, stage1_default=share[0], stage1_share=share))


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


def _value(cfg: Config, key: str) -> Any:
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def validate(cfg: Config) -> None:
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
    share = t.max_steps * TrainingConfig.stage1_steps // TrainingConfig.max_steps  # the seed's 75 of 125
    _require(t.stage1_steps <= t.max_steps,
             f"training.stage1_steps must be between 0 and training.max_steps ({t.max_steps}), got {t.stage1_steps}: "
             f"set training.stage1_steps={share} (the default's share) or less")
    _validate_labels(cfg.run)
    _require(bool(cfg.lora.target_modules), "lora.target_modules must name at least one module")
    _require(cfg.model.tiny_hidden_size % 4 == 0, "model.tiny_hidden_size must be a multiple of 4")


def config_text(cfg: Config) -> str:
    """The resolved config as YAML, as config.yaml holds it (`loratrace train --print-config` prints it)."""
    return "# Re-run this experiment: loratrace train --config <this file>\n" + yaml.safe_dump(cfg.to_dict(),
                                                                                              sort_keys=False)


def _validate_labels(run: RunConfig) -> None:
    """run.name and run.tags are shown in one-line tables and a tag list is stored comma-joined in the runs view."""
    _require(len(run.name) <= 100 and run.name.isprintable(),
             f"run.name must be one line of at most 100 printable characters, got {_shown_text(run.name)}")
    for tag in run.tags:
        _require(0 < len(tag) <= 64 and tag.isprintable() and "," not in tag and tag == tag.strip(),
                 f"run.tags: {_shown_text(tag)} must be 1 to 64 printable characters, no comma or edge spaces")


def _shown_text(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:40] + "...")


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(config_text(cfg))
