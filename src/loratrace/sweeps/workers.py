"""A sweep's workers: each takes trials with Optuna's ask/tell under the study folder's lock, trains each as a normal
run through the recipe, and tells Optuna how it ended (`loratrace sweep --jobs N` starts N of them as processes).

    work(read_spec("runs/sweeps/<study>"), worker=0)      # until the study has its trials complete or pruned

A worker that dies leaves its trial RUNNING: the next worker on this host sees the process gone (pid and start time
in the trial's `worker` attribute), one on another host after the heartbeat's grace period (Optuna's
`fail_stale_trials`). The trial is marked failed and re-queued with its parameters (RetryHeartbeatStaleTrialCallback),
and its rerun continues the run folder from its last checkpoint, or keeps the run if it had already finished.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import warnings
from collections import Counter
from pathlib import Path

from loratrace.config import Config, ConfigError
from loratrace.errors import LoratraceError, first_line
from loratrace.recipe import train
from loratrace.runs import folder, processes
from loratrace.sweeps.reporter import TrialReporter
from loratrace.sweeps.space import SearchSpace
from loratrace.sweeps.spec import (
    SweepSpec,
    make_pruner,
    make_sampler,
    open_storage,
    retry_callback,
    snapshot,
    study_lock,
)
from loratrace.sweeps.trials import Objective, is_number, write_trials
from loratrace.training.checkpoints import latest_full_checkpoint
from loratrace.training.interrupt import RunInterrupted


class SweepInterrupted(LoratraceError):
    """A sweep stopped by a signal: `--resume` continues it."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class WorkerFailed(LoratraceError):
    """A worker process of `--jobs N` that exited non-zero (its own error line is above); the sweep exits with its
    code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def run_sweep(spec: SweepSpec, jobs: int = 1, setup=None) -> None:
    """Run workers until the study has `spec.trials` complete or pruned trials. `setup(spec)` runs once `jobs` is
    checked, before any worker starts: what the sweep writes first (a new study, an updated sweep.json), so a bad
    `jobs` writes nothing. Raises what ended a worker: its trial's error (jobs 1), `WorkerFailed` or
    `SweepInterrupted` (jobs > 1: the first worker that exited non-zero)."""
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    if setup is not None:
        setup(spec)
    if jobs == 1:
        work(spec, worker=0)
        return
    env = {**os.environ, PARENT_ENV: str(os.getpid())}  # each worker dies with this process (`follow_parent`)
    children = [subprocess.Popen([sys.executable, "-m", "loratrace", "sweep", "--study", spec.study_dir,
                                  "--storage", spec.storage, "--worker", str(i), "--jobs", str(jobs)],
                                 start_new_session=True, env=env)  # Ctrl+C reaches them once, through `forward`
                for i in range(jobs)]
    forward = lambda signum, frame: [c.send_signal(signum) for c in children if c.poll() is None]  # noqa: E731
    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        codes = [child.wait() for child in children]
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    failed = next(((i, child.pid, code) for i, (child, code) in enumerate(zip(children, codes)) if code), None)
    if failed is not None:
        raise worker_failure(spec, *failed)


def worker_failure(spec: SweepSpec, worker: int, pid: int, code: int) -> LoratraceError:
    """The error for worker process `worker` (`pid`) that exited with `code` (negative: killed by that signal)."""
    code = 128 - code if code < 0 else code  # as a shell reports a process a signal ended
    again = f"continue it with: loratrace sweep --resume {spec.study_dir}"
    if code in (128 + signal.SIGINT, 128 + signal.SIGTERM):  # the worker's own SweepInterrupted (or the signal)
        return SweepInterrupted(f"sweep interrupted; {again}", code)
    trial = _last_trial_of(spec, pid)
    during = f" during trial {trial}" if trial is not None else ""
    return WorkerFailed(f"sweep worker {worker} (pid {pid}) exited with code {code}{during} (its error is above); "
                        f"{again}", code)


def _last_trial_of(spec: SweepSpec, pid: int) -> int | None:
    """The last trial worker process `pid` of this host took, as the study records it (None if it took none)."""
    import optuna

    with contextlib.suppress(Exception):  # the study unreadable now: the message goes without the trial
        study = optuna.load_study(study_name=spec.study, storage=open_storage(spec))
        taken = [t.number for t in study.get_trials(deepcopy=False)
                 if (w := t.user_attrs.get("worker") or {}).get("pid") == pid and processes.on_this_host(w)]
        return max(taken, default=None)
    return None


def work(spec: SweepSpec, worker: int, jobs: int = 1) -> None:
    """One worker: take trials until the study has enough, train each (see `run_trial`)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    follow_parent()
    if jobs > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // jobs))  # workers share the machine's cores
    storage = open_storage(spec)
    probe = optuna.load_study(study_name=spec.study, storage=storage)
    # One sweep, one worker, never interrupted: exactly --seed. Other workers and later launches draw their own
    # stream, so two of them never propose the same random start-up points.
    existing = len(probe.trials)
    seed = spec.seed if worker == 0 and existing == 0 else hash((spec.seed, worker, existing)) % 2**31
    study = optuna.load_study(study_name=spec.study, storage=storage, sampler=make_sampler(spec.sampler, seed),
                              pruner=make_pruner(spec.pruner))
    space, goal, base = spec.space(), spec.goal(), spec.base_config()
    failures = 0
    while failures < spec.trials:
        trial = take_trial(spec, study)
        if trial is None:
            return
        state = run_trial(spec, study, storage, trial, space, goal, base, worker)
        failures += state == "fail"


PARENT_ENV = "LORATRACE_SWEEP_PARENT"  # the pid of the `sweep` that started this worker process
PARENT_POLL_S = 1.0


def follow_parent() -> None:
    """A worker started by `run_sweep` lives in its own session (Ctrl+C reaches it once, forwarded), so nothing would
    stop it when its `sweep` is SIGKILLed: it asks the kernel for SIGTERM when the parent dies (Linux's
    PR_SET_PDEATHSIG) and, where that is missing, a thread sends it once the parent is gone. SIGTERM stops the trial
    at the end of its update with a checkpoint, re-queued for `sweep --resume`, as a scheduler's pre-emption would."""
    parent = os.environ.pop(PARENT_ENV, None)  # the trials' own processes are not workers
    if not parent:
        return
    parent = int(parent)
    kernel_sends = _ask_kernel_for_sigterm_on_parent_death()
    if os.getppid() != parent:  # died before the request: nothing will send it
        os.kill(os.getpid(), signal.SIGTERM)
        return
    if kernel_sends:  # one SIGTERM, not a second one that would abort the checkpointed stop
        return

    def watch() -> None:
        while os.getppid() == parent:
            threading.Event().wait(PARENT_POLL_S)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="sweep-parent-watch", daemon=True).start()


def _ask_kernel_for_sigterm_on_parent_death() -> bool:
    """prctl(PR_SET_PDEATHSIG, SIGTERM) on Linux; whether the kernel took the request."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    PR_SET_PDEATHSIG = 1  # noqa: N806 - linux/prctl.h's name
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM) == 0
    except (OSError, AttributeError):
        return False


def take_trial(spec: SweepSpec, study):
    """Under the study lock: release the trials of dead workers, then ask for a trial if the study needs one."""
    import optuna
    from optuna.trial import TrialState

    with study_lock(spec.folder):
        release_dead_workers(spec, study)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fail_stale_trials is experimental
            optuna.storages.fail_stale_trials(study)  # heartbeats: workers on other machines
        states = Counter(t.state for t in study.get_trials(deepcopy=False))
        if states[TrialState.COMPLETE] + states[TrialState.PRUNED] + states[TrialState.RUNNING] >= spec.trials:
            write_trials(spec.folder, spec.study, study.get_trials(deepcopy=False), spec.goal())
            return None
        with warnings.catch_warnings():  # "heartbeat is supposed to be used with optimize": we beat (`heartbeat`)
            warnings.simplefilter("ignore")
            trial = study.ask()  # a re-queued or enqueued trial first
        trial.set_user_attr("worker", worker_identity())
        write_trials(spec.folder, spec.study, study.get_trials(deepcopy=False), spec.goal())
    return trial


def release_dead_workers(spec: SweepSpec, study) -> list[int]:
    """RUNNING trials whose worker on this host is gone: failed, their run folder marked, re-queued."""
    from optuna.trial import TrialState

    released = []
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = frozen.user_attrs.get("worker") or {}
        if not processes.on_this_host(worker) or processes.alive(worker):
            continue
        study.tell(frozen.number, state=TrialState.FAIL, skip_if_finished=True)
        run_dir = frozen.user_attrs.get("run_dir")
        if run_dir and folder.read_run_json(Path(run_dir)).get("status") == "running":
            folder.finish_run(Path(run_dir), "failed", {"error": f"sweep worker (pid {worker.get('pid')}) died during "
                                                               f"trial {frozen.number}"})
        retry_callback()(study, _frozen(study, frozen.number))
        released.append(frozen.number)
    return released


def _frozen(study, number: int):
    return next(t for t in study.get_trials(deepcopy=False) if t.number == number)


def worker_identity() -> dict:
    return processes.this_process()


process_alive = processes.alive  # a worker's record is a process record (processes.py)


def resume_point(run_dir: Path, max_steps: int) -> Path | None:
    """The checkpoint a re-queued trial continues its run folder from: the latest full one (a weights-only tail
    file cannot resume) before `max_steps`, or None to train from the start. A worker that died after its last
    checkpoint but before the run's end trains that last step again: a resume from the last step would train
    nothing, and is refused."""
    return latest_full_checkpoint(run_dir, step=max_steps - 1) if Path(run_dir).is_dir() else None


@contextlib.contextmanager
def heartbeat(storage, study_name: str, number: int, seconds: int):
    """Optuna's heartbeat for an ask/tell trial: `record_heartbeat` every `seconds` while it trains."""
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study_name), number)
    stop = threading.Event()

    def beat() -> None:
        while True:
            with contextlib.suppress(Exception):  # a busy database: the next beat
                storage.record_heartbeat(trial_id)
            if stop.wait(seconds):
                return

    thread = threading.Thread(target=beat, name="optuna-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def run_trial(spec: SweepSpec, study, storage, trial, space: SearchSpace, goal: Objective, base: Config,
              worker: int) -> str:
    """Train one trial as a normal run (continuing its run folder if it is a re-queued one) and tell Optuna how it
    ended; returns the state told. A signal stops the sweep (the trial is re-queued for --resume)."""
    from optuna.trial import TrialState

    values = space.suggest(trial)
    cfg = space.config(base, values)
    previous = Path(trial.user_attrs["run_dir"]) if trial.user_attrs.get("run_dir") else None
    resume_from = resume_point(previous, cfg.training.max_steps) if previous is not None else None
    shown = ", ".join(f"{k}={v}" for k, v in values.items())
    print(f"trial {trial.number}: {shown}" + (f" (continues {previous.name})" if resume_from else "")
          + (f" [worker {worker}]" if worker else ""), file=sys.stderr, flush=True)
    reporter = TrialReporter(trial, goal, spec.study, cfg, on_run_dir=lambda _: snapshot(spec, study))
    info = folder.read_run_json(previous) if resume_from else {}
    done = info.get("status")
    try:
        if done in ("completed", "pruned"):  # trained to its end before the worker died: never trained twice
            info.update(trial=trial.number, trials=[*info.get("trials", []), trial.number])
            folder.write_run_json(previous, info)
            run_dir, reporter.pruned_step = previous, info.get("pruned_step") if done == "pruned" else None
        else:
            with heartbeat(storage, spec.study, trial.number, spec.heartbeat_s):
                run_dir = train(cfg, resume_from=resume_from, progress=False, callbacks=[reporter],
                                checkpoint_listeners=[reporter])
    except BaseException as error:
        stopped = isinstance(error, (RunInterrupted, KeyboardInterrupt))
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        if stopped:
            retry_callback()(study, _frozen(study, trial.number))
        snapshot(spec, study)
        if stopped:
            code = getattr(error, "exit_code", 130)
            raise SweepInterrupted(f"sweep interrupted during trial {trial.number}; continue it with: "
                                   f"loratrace sweep --resume {spec.study_dir}", code) from None
        if isinstance(error, LoratraceError):
            error.args = (f"trial {trial.number}: {first_line(error)}",)
        raise
    return tell_outcome(spec, study, trial, goal, cfg, run_dir, reporter.pruned_step, already_pruned=done == "pruned")


def tell_outcome(spec: SweepSpec, study, trial, goal: Objective, cfg: Config, run_dir: Path, pruned_step: int | None,
                 already_pruned: bool) -> str:
    """Tell Optuna how trial's run ended (pruned at `pruned_step`, else the objective's value, or failed when it has
    none), rewrite trials.parquet and print the trial's line; returns the state told."""
    from optuna.trial import TrialState

    if pruned_step is not None:
        if not already_pruned:
            folder.finish_run(run_dir, "pruned", pruned_step=pruned_step)
        study.tell(trial, state=TrialState.PRUNED)
        state = "pruned"
    else:
        value, step = goal.final(run_dir, cfg)
        if is_number(value):
            trial.set_user_attr("objective_step", step)
            study.tell(trial, value)
            state = "complete"
        else:
            study.tell(trial, state=TrialState.FAIL)
            state = "fail"
    snapshot(spec, study)
    frozen = _frozen(study, trial.number)
    at = f" at step {pruned_step}" if state == "pruned" else ""
    measured = f"  {spec.objective} {frozen.value:.6g}" + (" (last reported)" if at else "") \
        if frozen.value is not None else ""
    print(f"trial {trial.number} {state}{at}{measured}  {run_dir}", flush=True)
    return state


