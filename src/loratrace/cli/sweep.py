"""`loratrace sweep`'s arguments and command (cli/app.py adds them): it parses and prints; the library
(sweeps/run.py: `sweep`, `resume_sweep`) does the work.

    loratrace sweep [--config F] --param 'key=uniform(a,b)' ... [--trials N] [--objective O] [--jobs N] [key=value ...]
    loratrace sweep --resume runs/sweeps/<study> [--jobs N] [--trials N]
    loratrace sweep --storage URL --study NAME            # another machine joins a study on a shared storage
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loratrace.config import ConfigError, load_config

SWEEP_DESCRIPTION = """Hyperparameter search on Optuna: each trial is a normal run folder (run.json names study and
trial), trained like `loratrace train`; the study lives in runs/sweeps/<study>/ (sweep.json, study.db,
trials.parquet). --resume DIR continues a study; --storage URL --study NAME joins one on a shared storage.

--param KEY=RANGE over any config key:
  loguniform(a,b)     a float, log-uniform in [a, b]     training.learning_rate_stage1=loguniform(1e-5,1e-3)
  uniform(a,b)        a float, uniform in [a, b]         lora.dropout=uniform(0.0,0.1)
  int(a,b[,step=s])   an integer in [a, b], every s      training.stage1_steps=int(50,100,step=25)
  choice(x,y,...)     one of the values                  lora.r=choice(4,8,16)

Objectives: eval_accuracy (default; maximize): accuracy on eval.split (eval.limit, eval.scoring apply) of the best or
--checkpoint last checkpoint, every checkpoint scored as it is written; final_loss (minimize): the last update's
training loss. The same measure at each checkpoint goes to the pruner.
--sampler and --pruner take Optuna's options as NAME:key=value,... (e.g. --pruner median:n_startup_trials=2)."""


def add_sweep(sub) -> None:
    sweep = sub.add_parser("sweep", help="hyperparameter search on Optuna; every trial a tracked run folder",
                           description=SWEEP_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep.add_argument("--config", help="the base YAML config (default: the embedded default)")
    sweep.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of the base config")
    sweep.add_argument("--param", action="append", default=[], metavar="KEY=RANGE", help="a searched key (repeatable)")
    sweep.add_argument("--trials", type=int, help="complete or pruned trials wanted (default 10; on --resume, as "
                                                  "recorded)")
    sweep.add_argument("--objective", default="eval_accuracy", help="eval_accuracy (default) or final_loss")
    sweep.add_argument("--checkpoint", default="best", help="eval_accuracy of the best (default) or last checkpoint")
    sweep.add_argument("--direction", help="maximize or minimize (default: the objective's)")
    sweep.add_argument("--study", help="the study's name (runs/sweeps/NAME) or folder; an existing study continues")
    sweep.add_argument("--resume", metavar="DIR", help="continue the study in DIR (runs/sweeps/<study>)")
    sweep.add_argument("--storage", help="an Optuna RDB storage URL (default: sqlite:///runs/sweeps/<study>/study.db)")
    sweep.add_argument("--sampler", default="tpe", help="tpe (default), random, gp or qmc, seeded by --seed")
    sweep.add_argument("--seed", type=int, help="the sampler's seed (default: training.seed)")
    sweep.add_argument("--pruner", default="median", help="median (default), percentile, successive_halving, "
                                                          "hyperband, threshold or none")
    sweep.add_argument("--enqueue", action="append", default=[], metavar="JSON",
                       help='a trial to run first, e.g. \'{"lora.r": 8}\' (repeatable)')
    sweep.add_argument("--jobs", type=int, default=1, help="worker processes on this machine (default 1)")
    sweep.add_argument("--heartbeat", type=int, default=30, help="seconds between a worker's heartbeats (default 30)")
    sweep.add_argument("--track-batches", action="store_true", help="record every batch of every trial")
    sweep.add_argument("--runs-dir", help="folder for run folders and sweeps/ (config key runs_dir)")
    sweep.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # one of --jobs' processes


def cmd_sweep(args: argparse.Namespace) -> int:
    # optuna and torch only when this command runs: `loratrace query` imports this module too
    from loratrace.sweeps import run, workers
    from loratrace.sweeps.spec import SPEC_FILE, read_spec

    if args.worker is not None:  # one of --jobs' processes (run.run_sweep starts them)
        spec = read_spec(args.study)
        spec.storage = args.storage or spec.storage
        workers.work(spec, args.worker, args.jobs)
        return 0
    existing = args.resume or (args.study if args.study and (Path(args.study) / SPEC_FILE).is_file() else None)
    if not existing and args.storage and args.study and not args.param:  # another machine joins a shared study
        existing = str(run.join_sweep(args.storage, args.study, args.runs_dir or "runs"))
    if existing:
        given = [flag for flag, value in (("--param", args.param), ("--config", args.config), ("key=value",
                 args.overrides), ("--enqueue", args.enqueue)) if value]
        if given:
            raise ConfigError(f"{existing} continues as its sweep.json records it: {given[0]} starts a new study "
                              "(name another --study)")
        spec = run.resume_sweep(existing, jobs=args.jobs, trials=args.trials, storage=args.storage)
    else:
        enqueue = [_enqueued(text) for text in args.enqueue]
        overrides = list(args.overrides) + (["tracking.enabled=true"] if args.track_batches else []) + \
            ([f"runs_dir={args.runs_dir}"] if args.runs_dir else [])
        trials = 10 if args.trials is None else args.trials  # 0 is refused, not taken for the default
        spec = run.sweep(load_config(args.config, overrides), args.param, trials, jobs=args.jobs, enqueue=enqueue,
                         objective=args.objective, direction=args.direction, checkpoint=args.checkpoint,
                         study=args.study, storage=args.storage, sampler=args.sampler, seed=args.seed,
                         pruner=args.pruner, heartbeat_s=args.heartbeat)
    print(run.summary(spec))
    return 0


def _enqueued(text: str) -> dict:
    try:
        fixed = json.loads(text)
    except ValueError:
        fixed = None
    if not isinstance(fixed, dict):
        raise ConfigError(f"--enqueue {text}: give a JSON object of parameter values, e.g. '{{\"lora.r\": 8}}'")
    return fixed
