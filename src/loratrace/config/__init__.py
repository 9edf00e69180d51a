"""One typed config for a run: YAML in, dotted `key.sub=value` overrides, legacy keys translated, validated.

    cfg = load_config("configs/tiny.yaml", ["training.max_steps=20"])
    save_config(cfg, "runs/x/config.yaml")        # re-runs as is

Every error a user can make here raises `ConfigError` with one line naming the key (and the closest known
key); the CLI turns it into exit code 2 before any work starts.
"""

from loratrace.config.checks import BOUNDS, CHOICES, Bounds, validate
from loratrace.config.schema import (
    CheckpointConfig,
    Config,
    DataConfig,
    EvalConfig,
    ExportConfig,
    LoggingConfig,
    LoraConfig,
    ModelConfig,
    RunConfig,
    TrackingConfig,
    TrainingConfig,
    config_from_flat,
    config_text,
    known_keys,
    load_config,
    save_config,
)
from loratrace.errors import ConfigError
from loratrace.overrides import flatten_keys, parse_override

__all__ = ["BOUNDS", "CHOICES", "Bounds", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "EvalConfig",
           "ExportConfig", "LoggingConfig", "LoraConfig", "ModelConfig", "RunConfig", "TrackingConfig",
           "TrainingConfig", "config_from_flat", "config_text", "flatten_keys", "known_keys", "load_config",
           "parse_override", "save_config", "validate"]
