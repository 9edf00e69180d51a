"""`loratrace sweep`'s library calls: hyperparameter search on Optuna, every trial a normal run folder trained by the
recipe. Above the study (spec.py) and its workers (workers.py).

    spec = sweep(load_config("configs/tiny.yaml"), ["lora.r=choice(4,8,16)"], trials=8, objective="final_loss")
    spec = resume_sweep("runs/sweeps/<study>", jobs=2)  # after a crash or Ctrl+C: finish the remaining trials
    print(summary(spec))

Both return the study's spec once the workers have ended, and raise when one did not end well: a trial's error
(`trial N: ...`), `WorkerFailed` (a worker process of `jobs` > 1 that exited non-zero, named with its trial) or
`SweepInterrupted` (a signal; `resume_sweep` continues). Workers take trials with Optuna's ask/tell under a lock on
the study folder, so the requested number is never exceeded and no two workers train one trial. A worker that dies
(SIGKILL, power loss) leaves its trial RUNNING: the next worker on this host sees the process gone, another host
after the heartbeat's grace period (Optuna's `fail_stale_trials`); the trial is marked failed and re-queued
(Optuna's RetryHeartbeatStaleTrialCallback) with the same parameters, and its rerun continues the run folder from
its last checkpoint.
"""

from __future__ import annotations

import socket
import sys
from collections import Counter
from pathlib import Path

from loratrace.config import Config, ConfigError
from loratrace.sweeps.spec import (
    SweepSpec,
    create_study,
    local_runs_dir,
    open_storage,
    plan_sweep,
    read_spec,
    require_optuna,
    write_spec,
)
from loratrace.sweeps.workers import run_sweep

# ---------------------------------------------------------------------------------------------- summary

def summary(spec: SweepSpec) -> str:
    """The study in a few lines: trials by state, the best trial, its parameters and run folder."""
    import optuna  # optional (loratrace[sweep]): a missing one is require_optuna's one line, not an ImportError

    study = optuna.load_study(study_name=spec.study, storage=open_storage(spec))
    trials = study.get_trials(deepcopy=False)
    counts = Counter(t.state.name.lower() for t in trials)
    states = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    lines = ["", f"study        {spec.study}   ({spec.study_dir})", f"trials       {states}   (of {spec.trials})"]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        step = best.user_attrs.get("objective_step")
        lines += [f"best         trial {best.number}: {spec.objective} {best.value:.6g}"
                  + (f" (checkpoint step {step})" if step is not None and spec.objective == "eval_accuracy" else ""),
                  "params       " + "  ".join(f"{k}={v}" for k, v in best.params.items()),
                  f"run          {best.user_attrs.get('run_dir')}"]
    else:
        lines.append("best         none yet: no trial completed")
    lines += [f"trials view  loratrace query \"SELECT trial, state, params, objective, run_id FROM trials\" "
              f"--runs-dir {Path(spec.study_dir).parent.parent}",
              f"dashboard    optuna-dashboard {spec.storage}"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- library calls

def sweep(cfg: Config, params: list[str], trials: int = 10, jobs: int = 1, **options) -> SweepSpec:
    """Plan (every check first), create the study, run `jobs` workers; returns the spec (`summary(spec)` says how it
    went). `options`: those of `plan_sweep`."""
    spec = plan_sweep(cfg, params, trials, **options)
    run_sweep(spec, jobs, setup=_create)
    return spec


def _create(spec: SweepSpec) -> None:
    create_study(spec)
    print(f"study {spec.study}: {spec.study_dir}", file=sys.stderr, flush=True)


def join_sweep(storage: str, study: str, runs_dir: str | Path = "runs") -> Path:
    """Another machine's way in: the study's spec from the shared storage (its user attribute) into a local study
    folder, <runs_dir>/sweeps/<study>/, that `resume_sweep` then runs workers from."""
    require_optuna()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    runs_dir = local_runs_dir(str(runs_dir))
    folder = (Path(runs_dir) / "sweeps" / study).resolve()
    probe = SweepSpec(study, str(folder), storage, {}, [], 1)
    try:
        recorded = optuna.load_study(study_name=study, storage=open_storage(probe)).user_attrs.get("loratrace_sweep")
    except KeyError:
        raise ConfigError(f"{storage} has no study {study}") from None
    if not recorded:
        raise ConfigError(f"study {study} in {storage} was not made by loratrace sweep (no loratrace_sweep attribute)")
    base = {**recorded["base"], "runs_dir": str(Path(runs_dir).resolve())}  # this machine's runs folder
    spec = SweepSpec(**{**recorded, "study_dir": str(folder), "storage": storage, "base": base})
    folder.mkdir(parents=True, exist_ok=True)
    write_spec(spec)
    return folder


def check_trial_runs(spec: SweepSpec, study) -> None:
    """A study copied or moved with its study.db (its runs folder too, or not) still names the original's run folders
    in its trials: resumed, it would train on in them. Refused when a trial of this host ran outside the runs folder
    the spec names (trials of other hosts joined through a shared --storage keep their own folders)."""
    runs_dir = Path(spec.base["runs_dir"]).resolve()
    for trial in study.get_trials(deepcopy=False):
        run_dir = trial.user_attrs.get("run_dir")
        host = (trial.user_attrs.get("worker") or {}).get("host")
        if run_dir and host == socket.gethostname() and not Path(run_dir).resolve().is_relative_to(runs_dir):
            raise ConfigError(f"{spec.folder}: trial {trial.number} ran in {run_dir}, outside this study's runs "
                              f"folder {runs_dir} (the study was moved or copied): resume the original study, or "
                              "start a new one")


def resume_sweep(folder: str | Path, jobs: int = 1, trials: int | None = None, storage: str | None = None) -> SweepSpec:
    """Continue a study from its folder: finished trials are kept, a dead worker's trial is re-queued and continues
    its run from the last checkpoint; `trials` raises (or lowers) the number wanted."""
    import optuna

    spec = read_spec(folder)
    spec.storage = storage or spec.storage
    if trials is not None:
        if trials < 1:
            raise ConfigError(f"--trials must be at least 1, got {trials}")
        spec.trials = trials
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=spec.study, storage=open_storage(spec))
    except KeyError:
        raise ConfigError(f"{spec.storage} has no study {spec.study}") from None
    check_trial_runs(spec, study)
    run_sweep(spec, jobs, setup=write_spec if trials is not None else None)  # the new count, once --jobs is good
    return spec
