"""`loratrace train`: parse, then call `loratrace.train` (recipe.py) for each data set, or once for a resume: the
library resolves what a resume continues from (a remote checkpoint, a Trainer checkpoint-N/ folder, the run's
config), so the command and the Python call resume alike."""

from __future__ import annotations

import argparse
import json

from loratrace.config import CHOICES, ConfigError, config_text, load_config

PROGRESS = CHOICES["logging.progress"]


def add_train(sub) -> None:
    train = sub.add_parser("train", help="fine-tune with LoRA and write a run folder",
                           description="Fine-tune with LoRA; writes runs/<dataset>_<method>_<time>/.")
    train.add_argument("--config", help="YAML config (default: the embedded default: tiny model, bundled sample)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. training.max_steps=20")
    train.add_argument("--track-batches", action="store_true", help="record every batch in tracking/ (Parquet)")
    train.add_argument("--resume-from-checkpoint", metavar="CKPT",
                       help="continue a run from one of its .ckpt files, or from a Hugging Face Trainer checkpoint-N/ "
                            "folder (a legacy run's is imported first)")
    train.add_argument("--dataset", action="append", metavar="NAME", help="train one run per data set, in turn")
    train.add_argument("--runs-dir", help="folder for run folders (config key runs_dir)")
    train.add_argument("--print-config", action="store_true",
                       help="print the resolved config as YAML (what config.yaml would hold) and exit; writes nothing")
    train.add_argument("--progress", choices=PROGRESS,
                       help="progress on stderr: bar, lines (one every logging.progress_every_n_steps), none; auto "
                            "(default, config key logging.progress): the bar on a terminal, lines otherwise")
    train.add_argument("--name", help="a short name for the run, shown by runs, compare and report (config run.name)")
    train.add_argument("--tag", action="append", metavar="T",
                       help="a label to find the run by with `runs --tag T` (repeatable; config run.tags)")


def cmd_train(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.track_batches:
        overrides.append("tracking.enabled=true")
    if args.runs_dir:
        overrides.append(f"runs_dir={args.runs_dir}")
    if args.progress:
        overrides.append(f"logging.progress={args.progress}")
    if args.name is not None:  # as JSON, a YAML string: the name as typed, never read as a number or a mapping
        overrides.append(f"run.name={json.dumps(args.name)}")
    if args.tag:
        overrides.append(f"run.tags={json.dumps(args.tag)}")
    if args.print_config:
        return _print_config(args, overrides)
    if args.resume_from_checkpoint and args.dataset:
        raise ConfigError("--dataset cannot be combined with --resume-from-checkpoint")
    names = args.dataset or [None]
    # every config first, before torch loads: a mistyped key is one line in a second, not after the imports
    configs = [] if args.resume_from_checkpoint else [
        load_config(args.config, overrides + ([f"data.dataset={n}"] if n else [])) for n in names]
    from loratrace import recipe  # torch only when this command runs: `loratrace query` imports this module too

    if args.resume_from_checkpoint:
        recipe.train(args.config, resume_from=args.resume_from_checkpoint, overrides=overrides)
        return 0
    for cfg in configs:
        recipe.train(cfg)
    return 0


def _print_config(args: argparse.Namespace, overrides: list[str]) -> int:
    """`--print-config`: each data set's resolved config, YAML documents apart; nothing read but the config."""
    if args.resume_from_checkpoint:
        raise ConfigError("--print-config shows a new run's config; a resumed run's is its config.yaml")
    names = args.dataset or [None]
    configs = [load_config(args.config, overrides + ([f"data.dataset={n}"] if n else [])) for n in names]
    print("---\n".join(config_text(cfg) for cfg in configs), end="")
    return 0
