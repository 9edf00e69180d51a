"""`loratrace train --resume-from-checkpoint <Trainer checkpoint-N/ folder>`: the folder becomes a loratrace `.ckpt`
(the import's converter), and the usual resume continues from that file.

    ckpt = checkpoint_to_resume(Path("experiments/.../checkpoints/checkpoint-100"), config=None, overrides=[])

Inside a legacy run folder, the run is imported first (or its earlier import found) and the checkpoint's converted
file in the imported run is resumed: tracking continues there as a new attempt, and the legacy epoch's remaining
batches come first. A Trainer checkpoint anywhere else needs a config (`--config`); it starts a new run folder whose
data order is loratrace's own from epoch 0 (the Trainer's sampler position is not in the folder), said in one line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from loratrace.config import Config, ConfigError, load_config, parse_override
from loratrace.legacy import importer
from loratrace.legacy.checkpoint import (
    LegacyError,
    LoaderPosition,
    checkpoint_step,
    convert_trainer_checkpoint,
    is_trainer_checkpoint,
    trainable_shapes,
    write_checkpoint,
)
from loratrace.runs import folder as run_folder
from loratrace.training.checkpoints import checkpoint_name


def legacy_run_of(folder: Path) -> Path | None:
    """The legacy run folder holding Trainer checkpoint `folder` (`<run>/checkpoints/checkpoint-N`), if any."""
    run = folder.resolve().parent.parent
    return run if folder.resolve().parent.name == "checkpoints" and any(run.glob("logs/batch_tracking_*.jsonl")) \
        else None


def checkpoint_to_resume(folder: Path, config: Config | str | Path | None, overrides: list[str], notice=None) -> Path:
    """The `.ckpt` a resume from Trainer checkpoint `folder` continues from (written now if need be). `config`: the
    resume's Config, or its YAML file loaded with `overrides`, or None (only inside a legacy run: the import's)."""
    notice = notice or (lambda line: print(line, file=sys.stderr))
    if not is_trainer_checkpoint(folder):
        raise LegacyError(f"{folder} is a folder but not a Trainer checkpoint (no adapter_model.safetensors or .bin); "
                          "give a checkpoint-N/ folder or a .ckpt file")
    step = checkpoint_step(folder)
    source = legacy_run_of(folder)
    if source is not None:  # the imported run's config.yaml is the default config of the resume: read it after
        given = dict(parse_override(text) for text in overrides)
        runs_dir = config.runs_dir if isinstance(config, Config) else given.get("runs_dir") or (
            load_config(config, overrides).runs_dir if config else "runs")
        report = importer.import_legacy(source, runs_dir)
        run_dir = Path(report["run_dir"])
        if not report.get("existing"):
            notice(importer.summary(report))
        ckpt = run_dir / "checkpoints" / checkpoint_name(step)
        if not ckpt.is_file():
            raise LegacyError(_not_converted_why(run_dir, folder))
        return ckpt
    if config is None:
        raise ConfigError(f"{folder} is not inside a legacy run folder: give --config for the run it continues")
    cfg = config if isinstance(config, Config) else load_config(config, overrides)
    state = convert_trainer_checkpoint(folder, cfg, trainable_shapes(cfg), LoaderPosition())
    run_dir = run_folder.new_run_dir(cfg)
    ckpt = run_dir / "checkpoints" / checkpoint_name(step)
    write_checkpoint(state, ckpt)
    run_folder.write_run_json(run_dir, {"run_id": run_dir.name, "dataset": cfg.data.dataset, "method": cfg.method,
                                  "created_at": run_folder.utc_now().isoformat(timespec="seconds"), "attempts": [],
                                  "resumed_from_trainer_checkpoint": str(folder.resolve())})
    notice(f"note: {folder} has no batch tracking beside it: weights, optimizer, schedule and RNG continue at step "
           f"{step + 1}, the data order is loratrace's own from epoch 0")
    return ckpt


def _not_converted_why(run_dir: Path, folder: Path) -> str:
    """Why the import did not convert Trainer checkpoint `folder`, as its import_report.json says (when readable)."""
    fallback = f"{folder} was not converted (see {run_dir / importer.REPORT_FILE})"
    try:
        why = json.loads((run_dir / importer.REPORT_FILE).read_text())["checkpoints"].get("not_converted", {})
        return str(why.get(folder.name, fallback))
    except (OSError, ValueError, TypeError, KeyError, AttributeError):  # a report edited or cut since the import
        return fallback
