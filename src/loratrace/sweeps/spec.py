"""A sweep's study: what was asked (SweepSpec, sweep.json), every check before anything is written (plan_sweep), the
Optuna parts it names (sampler, pruner, storage), the study folder's creation and its lock.

    spec = plan_sweep(load_config("configs/tiny.yaml"), ["lora.r=choice(4,8)"], trials=4)   # ConfigError: one line
    create_study(spec)                      # runs/sweeps/<study>/: sweep.json, study.db
    spec = read_spec("runs/sweeps/<study>")

`runs/sweeps/<study>/` holds sweep.json (what was asked: base config, params, objective, sampler, pruner, storage),
study.db (Optuna's SQLite storage, unless --storage names another) and trials.parquet (the `trials` view); sweep.json's
paths are relative to the study folder, so a copied study reads its own study.db, never the original's. The workers
above this module (workers.py) take trials under the study folder's lock (`study_lock`); run.py holds the entry
points, `sweep` and `resume_sweep`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loratrace.config import Config, ConfigError, config_from_flat
from loratrace.errors import first_line
from loratrace.overrides import flatten_keys
from loratrace.runs import storage as run_storage
from loratrace.sweeps.space import SearchSpace, parse_params
from loratrace.sweeps.trials import OBJECTIVES, Objective, write_trials

SPEC_FILE = "sweep.json"
LOCK_FILE = ".lock"  # the study folder's lock: one creator, one worker taking a trial at a time
SAMPLERS = ("tpe", "random", "gp", "qmc")
PRUNERS = ("median", "percentile", "successive_halving", "hyperband", "threshold", "none")


@dataclass
class SweepSpec:
    """Everything a worker needs, as sweep.json holds it."""

    study: str
    study_dir: str
    storage: str
    base: dict  # the resolved base config (Config.to_dict), the objective's settings applied
    params: list[str]
    trials: int
    objective: str = "eval_accuracy"
    direction: str = "maximize"
    checkpoint: str = "best"
    sampler: str = "tpe"
    seed: int = 0
    pruner: str = "median"
    heartbeat_s: int = 30
    enqueue: list[dict] = field(default_factory=list)

    @property
    def folder(self) -> Path:
        return Path(self.study_dir)

    def base_config(self) -> Config:
        return config_from_flat(flatten_keys(self.base))

    def space(self) -> SearchSpace:
        return parse_params(self.params, self.base_config())

    def goal(self) -> Objective:
        return Objective(self.objective, self.direction, self.checkpoint)


def plan_sweep(cfg: Config, params: list[str], trials: int = 10, objective: str = "eval_accuracy",
               direction: str | None = None, checkpoint: str = "best", study: str | None = None,
               storage: str | None = None, sampler: str = "tpe", seed: int | None = None, pruner: str = "median",
               enqueue: list[dict] | None = None, heartbeat_s: int = 30) -> SweepSpec:
    """Check everything a sweep is asked before anything is written: params against the schema, objective, sampler,
    pruner, enqueued trials, a study name not taken. Raises ConfigError (one line)."""
    require_optuna()
    if objective not in OBJECTIVES:
        raise ConfigError(f"--objective {objective}: use one of {', '.join(OBJECTIVES)}")
    goal = Objective(objective, direction or OBJECTIVES[objective], checkpoint)
    base = goal.prepare(cfg)
    space = parse_params(params, base)
    if trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {trials}")
    if heartbeat_s < 1:
        raise ConfigError(f"--heartbeat must be at least 1 second, got {heartbeat_s}")
    for fixed in enqueue or []:
        unknown = sorted(set(fixed) - {p.key for p in space.params})
        if unknown:
            raise ConfigError(f"--enqueue {json.dumps(fixed)}: {unknown[0]} is not a --param of this sweep")
        space.config(base, fixed)  # each value valid for its key
    seed = cfg.training.seed if seed is None else seed
    make_sampler(sampler, seed)
    make_pruner(pruner)
    base.runs_dir = str(Path(local_runs_dir(base.runs_dir)).resolve())  # a resume from elsewhere finds the same runs
    name, folder = study_location(study, base)
    folder = folder.resolve()
    if (folder / SPEC_FILE).exists():
        raise ConfigError(f"study {name} exists ({folder}): continue it with loratrace sweep --resume {folder}, "
                          "or name another --study")
    if folder.exists() and (not folder.is_dir() or any(p.name != LOCK_FILE for p in folder.iterdir())):
        raise ConfigError(f"--study {study or folder}: {folder} is not a sweep's folder (no {SPEC_FILE}) and not "
                          "empty; name a new or empty folder")
    url = storage or f"sqlite:///{(folder / 'study.db').resolve()}"
    if (database := _sqlite_path(url)) is not None and not database.is_absolute():  # as SQLAlchemy reads it: from here
        url = f"sqlite:///{database.resolve()}"
    return SweepSpec(name, str(folder), url, base.to_dict(), space.texts, trials, objective, goal.direction,
                     checkpoint, sampler, seed, pruner, heartbeat_s, list(enqueue or []))


def local_runs_dir(runs_dir: str) -> str:
    """`runs_dir` as a local folder (a `file://` URL's path); object storage is refused: a study's lock, SQLite
    storage and trial runs need a file system (a shared one for several machines)."""
    if run_storage.is_remote(runs_dir):
        raise ConfigError(f"runs_dir {runs_dir}: sweeps on object storage are not supported; give a local or shared "
                          "folder (runs can be uploaded after)")
    return str(run_storage.local_form(runs_dir))


def study_location(study: str | None, cfg: Config) -> tuple[str, Path]:
    """A study's name and folder: `--study NAME` -> <runs_dir>/sweeps/NAME; a path -> that folder."""
    import datetime as dt

    if study and (os.sep in study or Path(study).is_dir()):
        return Path(study).name, Path(study)
    name = study or f"{cfg.data.dataset}_{dt.datetime.now():%Y%m%d_%H%M%S}"
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ConfigError(f"--study {name!r}: use letters, digits, '-', '_' and '.'")
    return name, Path(cfg.runs_dir) / "sweeps" / name


def _component(text: str, names: tuple[str, ...], what: str) -> tuple[str, dict[str, Any]]:
    """`name[:key=value,...]` -> (name, keyword arguments)."""
    name, _, rest = text.partition(":")
    if name not in names:
        raise ConfigError(f"--{what} {text}: use one of {', '.join(names)} (options as {name or what}:key=value,...)")
    kwargs = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--{what} {text}: {item!r} is not key=value")
        kwargs[key.strip()] = yaml.safe_load(value)
    return name, kwargs


def _built(factory, kwargs: dict, text: str, what: str):
    try:
        return factory(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--{what} {text}: {first_line(exc)}") from None


def require_optuna() -> None:
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise ConfigError("loratrace sweep needs Optuna: pip install 'loratrace[sweep]'") from None


def make_sampler(text: str, seed: int):
    """Optuna's sampler, seeded: tpe (default), random, gp, qmc."""
    import optuna

    name, kwargs = _component(text, SAMPLERS, "sampler")
    factory = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
               "gp": optuna.samplers.GPSampler, "qmc": optuna.samplers.QMCSampler}[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return _built(factory, {"seed": seed, **kwargs}, text, "sampler")


def make_pruner(text: str):
    """Optuna's pruner: median (default), percentile, successive_halving, hyperband, threshold, none."""
    import optuna

    name, kwargs = _component(text, PRUNERS, "pruner")
    factory = {"median": optuna.pruners.MedianPruner, "percentile": optuna.pruners.PercentilePruner,
               "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
               "hyperband": optuna.pruners.HyperbandPruner, "threshold": optuna.pruners.ThresholdPruner,
               "none": optuna.pruners.NopPruner}[name]
    return _built(factory, kwargs, text, "pruner")


def open_storage(spec: SweepSpec):
    """Optuna's RDB storage with heartbeats: a trial whose worker stops beating is failed and re-queued."""
    import optuna

    engine = {"connect_args": {"timeout": 60}} if spec.storage.startswith("sqlite") else {}  # workers wait their turn
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return optuna.storages.RDBStorage(
                spec.storage, engine_kwargs=engine, heartbeat_interval=spec.heartbeat_s,
                grace_period=3 * spec.heartbeat_s, heartbeat_stale_trial_callback=retry_callback())
        except Exception as exc:  # noqa: BLE001 - SQLAlchemy's errors for a bad URL, a missing driver, ...
            raise ConfigError(f"--storage {spec.storage}: {first_line(exc)}") from None


def retry_callback():
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return RetryHeartbeatStaleTrialCallback(max_retry=3, inherit_intermediate_values=True)


def create_study(spec: SweepSpec):
    """The study folder, its storage and sweep.json; enqueued trials first in line. If the storage cannot be opened,
    what this call made (the folders, study.db) is removed again; nothing that was there before."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    made = [p for p in (spec.folder, *spec.folder.parents) if not p.exists()]  # deepest first
    spec.folder.mkdir(parents=True, exist_ok=True)
    with creation_lock(spec):
        try:
            storage = open_storage(spec)
            study = optuna.create_study(storage=storage, study_name=spec.study, direction=spec.direction)
        except optuna.exceptions.DuplicatedStudyError:
            _remove_made(spec.folder, made)
            raise ConfigError(f"--study {spec.study}: the storage already has a study of that name") from None
        except BaseException:
            _remove_made(spec.folder, made)
            raise
        study.set_user_attr("loratrace_sweep", {k: v for k, v in asdict(spec).items() if k != "storage"})
        for fixed in spec.enqueue:
            study.enqueue_trial(fixed)
        write_spec(spec)
    snapshot(spec, study)
    return study


@contextlib.contextmanager
def creation_lock(spec: SweepSpec):
    """The study folder's lock while a new study is made: a second `sweep` making the same study at the same time is
    refused in one line (it would find half a study.db), and so is one that comes once sweep.json is written."""
    with open(spec.folder / LOCK_FILE, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"study {spec.study} ({spec.folder}) is being made by another loratrace sweep: wait for "
                              f"it, then join with loratrace sweep --resume {spec.folder}") from None
        try:
            if (spec.folder / SPEC_FILE).exists():
                raise ConfigError(f"study {spec.study} exists ({spec.folder}): continue it with loratrace sweep "
                                  f"--resume {spec.folder}, or name another --study")
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_made(folder: Path, made: list[Path]) -> None:
    """Undo a failed `create_study`: its default SQLite file (the folder was empty before: plan_sweep checks) and the
    folders it made, deepest first, each only if nothing else is in it."""
    for name in ("study.db", "study.db-journal", LOCK_FILE):
        (folder / name).unlink(missing_ok=True)
    for path in made:
        with contextlib.suppress(OSError):  # not empty: something else put a file there
            path.rmdir()


def write_spec(spec: SweepSpec) -> None:
    """sweep.json, its paths relative to the study folder (`_relative_paths`): a copied or moved study reads its own
    study.db and runs, never the original's."""
    path = spec.folder / SPEC_FILE
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps(_relative_paths(asdict(spec)), indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_spec(folder: str | Path) -> SweepSpec:
    """The study's spec, its paths as absolute ones for this folder. An older sweep.json holds absolute paths: read
    where it was made, refused when the folder was moved or copied (it would go on with the original's storage)."""
    path = Path(folder) / SPEC_FILE
    if not path.is_file():
        raise ConfigError(f"{folder} is not a sweep's folder (no {SPEC_FILE}); start one with loratrace sweep --param")
    try:
        recorded = json.loads(path.read_text())
        spec = SweepSpec(**_absolute_paths(recorded, Path(folder).resolve()))
    except (ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path}: not a sweep spec ({first_line(exc)})") from None
    if Path(spec.study_dir).resolve() != Path(folder).resolve():
        raise ConfigError(f"{path}: the study was made in {spec.study_dir}, not {Path(folder).resolve()} (moved or "
                          "copied): resume it there, or start a new study here")
    return spec


HERE = "."  # sweep.json's study_dir from now on: paths in it are relative to the study folder


def _relative_paths(recorded: dict) -> dict:
    """sweep.json's form of a spec: study_dir ".", runs_dir and a SQLite storage in the study folder relative to it."""
    folder = Path(recorded["study_dir"])
    base = {**recorded["base"], "runs_dir": os.path.relpath(recorded["base"]["runs_dir"], folder)}
    storage = recorded["storage"]
    database = _sqlite_path(storage)
    if database is not None and database.is_absolute():
        storage = "sqlite:///" + os.path.relpath(database, folder)
    return {**recorded, "study_dir": HERE, "storage": storage, "base": base}


def _absolute_paths(recorded: dict, folder: Path) -> dict:
    """A spec as sweep.json holds it, read from `folder`: relative paths resolved there (an older, absolute sweep.json
    unchanged)."""
    if recorded.get("study_dir") != HERE:
        return recorded
    base = {**recorded["base"], "runs_dir": str((folder / recorded["base"]["runs_dir"]).resolve())}
    storage = recorded["storage"]
    database = _sqlite_path(storage)
    if database is not None and not database.is_absolute():
        storage = f"sqlite:///{(folder / database).resolve()}"
    return {**recorded, "study_dir": str(folder), "storage": storage, "base": base}


def _sqlite_path(storage: str) -> Path | None:
    """The database file of a `sqlite:///PATH` URL (relative or absolute); None for any other storage."""
    prefix = "sqlite:///"
    if not storage.startswith(prefix) or storage[len(prefix):] in ("", ":memory:"):
        return None
    return Path(storage[len(prefix):].split("?", 1)[0])


@contextlib.contextmanager
def study_lock(folder: Path):
    """One worker at a time takes a trial or rewrites trials.parquet (workers on this machine; another machine on a
    shared --storage may overshoot the trial count by its own in-flight trials)."""
    with open(Path(folder) / LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def snapshot(spec: SweepSpec, study) -> None:
    with study_lock(spec.folder):
        write_trials(spec.folder, spec.study, study.get_trials(deepcopy=False), spec.goal())
