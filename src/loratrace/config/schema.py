"""The config schema: one dataclass per section, a docstring under every field; loading YAML and overrides
into it (validated by checks.py), and writing it back as config.yaml."""

from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loratrace.config.checks import validate
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


def config_text(cfg: Config) -> str:
    """The resolved config as YAML, as config.yaml holds it (`loratrace train --print-config` prints it)."""
    return "# Re-run this experiment: loratrace train --config <this file>\n" + yaml.safe_dump(cfg.to_dict(),
                                                                                              sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(config_text(cfg))
