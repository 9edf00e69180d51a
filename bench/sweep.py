"""Sweep overhead and time to the first pruned trial: `python -m bench.sweep [--trials 4] [--steps 10] [--repeats 2]`.

  overhead      N short trials through `loratrace.sweep` (Optuna storage, snapshots, the reporter reading each
                checkpoint's scores) / the same N configs (each trial's config.yaml) through `loratrace.train` one
                after another; arms interleaved (sweep, train, sweep, train), objective eval_accuracy, no pruning
  first prune   a sweep whose trial 1 has an absurd learning rate, median pruner after one complete trial: seconds from
                the sweep's start to that trial's end, the step it stopped at, and its time against a full trial's
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import optuna

import loratrace
from loratrace.config import load_config
from loratrace.sweeps.run import sweep

ROOT = Path(__file__).resolve().parents[1]


def base_config(runs_dir: Path, steps: int):
    return load_config(ROOT / "configs" / "tiny.yaml", [
        f"training.max_steps={steps}", f"training.stage1_steps={steps // 2}", "checkpoint.stage1_every_n_steps=1",
        "training.batch_size=8", "logging.swanlab=false", "export.merged_model=false", "eval.limit=32",
        f"runs_dir={runs_dir}"], notice=lambda line: None)


def trials_of(spec) -> list:
    return optuna.load_study(study_name=spec.study, storage=spec.storage).trials


def overhead(root: Path, trials: int, steps: int, repeats: int) -> dict:
    """Wall and CPU seconds (this process's, all threads: what a loaded machine does not inflate) of each arm."""
    params = ["lora.r=choice(4,8,16)", "training.learning_rate_stage1=loguniform(1e-3,1e-2)"]
    arms: dict[str, list[tuple[float, float]]] = {"train": [], "sweep": []}
    loratrace.train(base_config(root / "warm-up", 2), progress=False)  # imports, first model load: in neither arm
    configs: list[Path] = []
    for repeat in range(repeats + 1):
        if configs:  # the train arm: the configs the first sweep sampled (a seeded sampler samples them again)
            runs = root / f"train-{repeat}"
            wall, cpu = time.perf_counter(), time.process_time()
            for config in configs:
                loratrace.train(load_config(config, [f"runs_dir={runs}"]), progress=False)
            arms["train"].append((time.perf_counter() - wall, time.process_time() - cpu))
        if repeat == repeats:
            break
        wall, cpu = time.perf_counter(), time.process_time()
        spec = sweep(base_config(root / f"sweep-{repeat}", steps), params, trials, objective="eval_accuracy",
                     pruner="none", seed=0, study=f"overhead-{repeat}")
        arms["sweep"].append((time.perf_counter() - wall, time.process_time() - cpu))
        if not configs:
            configs = [Path(t.user_attrs["run_dir"]) / "config.yaml" for t in trials_of(spec)]
    result = {}
    for index, clock in enumerate(("wall", "cpu")):  # each sweep against the train arm run right after it
        ratios = sorted(s[index] / t[index] for s, t in zip(arms["sweep"], arms["train"]))
        sweep_s, train_s = (statistics.median(a[index] for a in arms[arm]) for arm in ("sweep", "train"))
        result[clock] = {"train_s": train_s, "sweep_s": sweep_s, "ratio": statistics.median(ratios),
                         "low": ratios[0], "high": ratios[-1], "per_trial_s": (sweep_s - train_s) / trials}
    return result


def first_prune(root: Path, steps: int) -> dict:
    start = time.time()
    spec = sweep(base_config(root / "prune", steps), ["training.learning_rate_stage1=choice(0.003,1000.0)"], 2,
                 objective="final_loss", pruner="median:n_startup_trials=1", seed=0, study="prune",
                 enqueue=[{"training.learning_rate_stage1": 0.003}, {"training.learning_rate_stage1": 1000.0}])
    full, pruned = trials_of(spec)
    assert pruned.state == optuna.trial.TrialState.PRUNED, pruned.state
    duration = (pruned.datetime_complete - pruned.datetime_start).total_seconds()
    return {"to_first_pruned_s": pruned.datetime_complete.timestamp() - start, "pruned_at_step": pruned.last_step,
            "steps": steps, "pruned_trial_s": duration,
            "full_trial_s": (full.datetime_complete - full.datetime_start).total_seconds()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        result = {"overhead": overhead(Path(tmp), args.trials, args.steps, args.repeats),
                  "first_prune": first_prune(Path(tmp), args.steps)}
    o, p = result["overhead"], result["first_prune"]
    print(f"machine: {platform.processor() or platform.machine()}, {platform.python_version()}")
    print("| figure | value |\n|---|---|")
    for clock, figures in o.items():
        print(f"| {args.trials} trials x {args.steps} steps, {clock} time: sweep / train one after another | "
              f"{figures['ratio']:.3f} (range {figures['low']:.3f}-{figures['high']:.3f}; {figures['sweep_s']:.1f} s "
              f"vs {figures['train_s']:.1f} s; {figures['per_trial_s']:+.2f} s per trial) |")
    print(f"| time to the first pruned trial (from the sweep's start) | {p['to_first_pruned_s']:.1f} s, pruned at step "
          f"{p['pruned_at_step']} of {p['steps']} |")
    print(f"| the pruned trial / a full trial | {p['pruned_trial_s']:.1f} s / {p['full_trial_s']:.1f} s |")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
