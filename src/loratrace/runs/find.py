"""Run folders as the query layer finds them (`find_runs`) and the facts of the `runs` view (`runs_info`): run.json
and every run's config.yaml flattened, a key any run has being a column.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import glob
import json
import re
from pathlib import Path
from typing import Any

import yaml

from loratrace.config import Config
from loratrace.errors import LoratraceError, first_line
from loratrace.overrides import flatten_keys
from loratrace.runs import processes

RUN_COLUMNS = ("run_id", "name", "tags", "dir", "dataset", "method", "created_at", "status", "duration_s",
               "final_loss", "replay_of_run", "replay_of_step", "replay_end_step", "replay_dropped",
               "replay_dropped_ids")  # then every run's config, flattened
# replay_*: a replay's run.json `replay_of` (proof/replay.py): the run, the checkpoint step it started from, its last
# step, how many examples it dropped and which (a JSON list); NULL for every other run
SWEEP_COLUMNS = ("study", "trial")  # from a sweep trial's run.json: columns once any run has them
CONFIG_SECTIONS = tuple(f.name for f in dataclasses.fields(Config) if dataclasses.is_dataclass(f.default_factory))
CHECKPOINT_FILE = re.compile(r"checkpoint-step-(\d+)\.ckpt")  # checkpoints.checkpoint_name's files


class RunsNotFound(LoratraceError):
    """A path that is neither a run folder nor a folder of runs."""

    exit_code = 1


def find_runs(paths: str | Path | list) -> list[Path]:
    """Run folders (those with config.yaml, run.json or tracking/) named by `paths`."""
    found: list[Path] = []
    for item in as_list(paths):
        matches = [Path(m) for m in sorted(glob.glob(str(item)))] or [Path(item)]
        for path in matches:
            if is_run_folder(path):
                found.append(path)
            elif path.is_dir():
                found += [p for p in sorted(path.iterdir()) if p.is_dir() and is_run_folder(p)]
            else:
                raise RunsNotFound(f"{path} is not a run folder or a folder of runs")
    return list(dict.fromkeys(p.resolve() for p in found))


def named_run_folders(paths) -> set[Path]:
    """The run folders `paths` names one by one (not found by listing a folder of runs or matching a glob): a command
    addressed at a damaged one fails, where one found among many is skipped with a warning."""
    return {Path(p).resolve() for p in as_list(paths) if not glob.has_magic(str(p)) and is_run_folder(Path(p))}


def as_list(paths) -> list:
    return list(paths) if isinstance(paths, (list, tuple)) else [paths]


def folders_of_runs(paths) -> list[Path]:
    """The folders whose listing `find_runs` reads: a new run in one of them changes its time."""
    folders = []
    for item in as_list(paths):
        if glob.has_magic(str(item)):
            parts = Path(item).parts
            folders.append(Path(*parts[:next(i for i, p in enumerate(parts) if glob.has_magic(p))] or ["."]))
        elif Path(item).is_dir() and not is_run_folder(Path(item)):
            folders.append(Path(item))
    return [f.resolve() for f in folders]


def study_folders(paths) -> list[Path]:
    """Sweep study folders (with sweep.json) named by `paths`: a study folder itself, the studies in a `sweeps/`
    folder, or those in a folder's sweeps/ (runs/ -> runs/sweeps/*/; the run folders themselves are not looked into)."""
    found: list[Path] = []
    for item in as_list(paths):
        for path in [Path(m) for m in sorted(glob.glob(str(item)))] or [Path(item)]:
            if (path / "sweep.json").is_file():
                found.append(path)
                continue
            for base in (path, path / "sweeps") if path.name == "sweeps" else (path / "sweeps",):
                if base.is_dir() and not is_run_folder(base):
                    found += [p for p in sorted(base.iterdir()) if (p / "sweep.json").is_file()]
    return list(dict.fromkeys(p.resolve() for p in found))


def is_run_folder(path) -> bool:
    """A run folder: it holds run.json, config.yaml or tracking/ (a Path, or remote_runs' RemotePath)."""
    return path.is_dir() and any((path / name).exists() for name in ("run.json", "config.yaml", "tracking"))


def _config_columns(config: dict) -> dict[str, Any]:
    """A run's config as `runs` view columns: dotted keys with `_` for `.`, lists joined by commas."""
    return {key.replace(".", "_"): ",".join(map(str, value)) if isinstance(value, list) else value
            for key, value in flatten_keys(config).items() if value != {}}


def runs_info(run_dirs: list[Path], folders: dict | None = None) -> tuple[list[str], list[list[str | None]]]:
    """Column names and rows, one per run: its run.json facts and its config flattened, every value a string or
    NULL (a config key any run has is a column; the other runs' value is NULL). `folders`: each run's
    (run.json, config.yaml) as `read_run_folder` gave them, when the caller has read them already.
    A run run.json says is `running` whose process on this host is gone shows `stale` (nothing is rewritten).
    `tags` are joined by commas (a tag holds none: config/checks.py); the runs view splits them into a list."""
    rows = []
    for run_dir in run_dirs:
        info, config = folders[run_dir] if folders else read_run_folder(run_dir)
        rows.append({
            **_config_columns(config),
            "run_id": info.get("run_id", run_dir.name), "dir": str(run_dir),
            "dataset": info.get("dataset", (config.get("data") or {}).get("dataset")),
            "method": info.get("method", config.get("method")),
            "created_at": info.get("created_at"), "status": shown_status(info),
            "name": info.get("name"), "tags": ",".join(map(str, info.get("tags") or [])) or None,
            "duration_s": duration_seconds(info), "final_loss": info.get("final_loss"),
            **{key: info[key] for key in SWEEP_COLUMNS if key in info}, **_replay_columns(info),
        })
    columns = list(dict.fromkeys([*RUN_COLUMNS, *(key for row in rows for key in row)]))
    return columns, [[None if row.get(c) is None else str(row[c]) for c in columns] for row in rows]


def _replay_columns(info: dict) -> dict[str, Any]:
    replay = info.get("replay_of") or {}
    dropped = replay.get("dropped")
    return {"replay_of_run": replay.get("run"), "replay_of_step": replay.get("step"),
            "replay_end_step": replay.get("end_step"),
            "replay_dropped": len(dropped) if isinstance(dropped, list) else None,
            "replay_dropped_ids": json.dumps(dropped) if isinstance(dropped, list) else None}


HYPERPARAMETERS_LEFT_OUT = ("run.", "runs_dir")  # labels and where the run lives: not how it was trained


def differing_keys(configs: list[dict[str, Any]]) -> list[str]:
    """The dotted config keys (config.yaml's, flattened) whose values are not the same in every one of `configs` (a
    key absent from one differs), sorted; the run's labels and runs_dir left out."""
    flat = [flatten_keys(config) for config in configs]
    keys = sorted({key for config in flat for key in config if not key.startswith(HYPERPARAMETERS_LEFT_OUT)})
    return [key for key in keys if len({json.dumps(c[key], default=str) if key in c else None for c in flat}) > 1]


# ---------------------------------------------------------------------------------------------- reading a run folder
# Every reader of a run folder's run.json and config.yaml goes through these: a file edited by hand, cut short or
# written by something else is one `DamagedRun` line naming the file and what is wrong, never a traceback later.


class DamagedRun(LoratraceError):
    """A run folder whose run.json, config.yaml or tracking/ (or a sweep's trials.parquet) is not what loratrace
    writes there."""


# run.json fields readers use, with the JSON types they must have (null is allowed: "not recorded")
RUN_JSON_FIELDS = {"run_id": str, "name": str, "tags": list,
                   "dataset": str, "method": str, "created_at": str, "status": str, "host": str,
                   "attempts": list, "steps": int, "checkpoints": int, "final_loss": (int, float), "study": str,
                   "trial": int, "trials": list, "versions": dict, "pruned_step": int, "replay_of": dict}
ATTEMPT_FIELDS = {"started_at": str, "ended_at": str, "status": str, "resumed_from": str, "tracking_cost": dict,
                  "config_changes": dict, "process": dict}
JSON_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", bool: "true/false", int: "a whole number",
                   float: "a number", type(None): "null"}


def read_run_info(run_dir) -> dict[str, Any]:
    """run.json as a dict whose known fields have the types loratrace writes ({} if there is none)."""
    path = run_dir / "run.json"
    if not path.exists():
        return {}
    text = _text(path)
    try:
        info = json.loads(text)
    except ValueError as exc:
        raise DamagedRun(f"{path}: not valid JSON ({first_line(exc)})") from None
    _require_type(path, "the whole file", info, dict)
    for key, kind in RUN_JSON_FIELDS.items():
        _require_type(path, key, info.get(key), kind)
    for number, attempt in enumerate(info.get("attempts") or []):
        if attempt is None:  # a missing field may be null; an attempt in the list may not
            raise DamagedRun(f"{path}: attempts[{number}] is null, expected an object")
        _require_type(path, f"attempts[{number}]", attempt, dict)
        for key, kind in ATTEMPT_FIELDS.items():
            _require_type(path, f"attempts[{number}].{key}", attempt.get(key), kind)
    return info


def read_run_config(run_dir) -> dict[str, Any]:
    """config.yaml as a mapping whose sections (model, data, training, ...) are mappings ({} if there is none)."""
    path = run_dir / "config.yaml"
    if not path.exists():
        return {}
    text = _text(path)
    try:
        # libyaml's parser where PyYAML has it (~10x faster: opening 100 runs parses 100 configs); the same values.
        # Its messages word a problem differently: a file it refuses is parsed again by PyYAML's for the message.
        config = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError:
        config = None
    try:
        config = yaml.safe_load(text) if config is None else config
    except yaml.YAMLError as exc:
        mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
        raise DamagedRun(f"{path}{f' line {mark.line + 1}' if mark else ''}: not valid YAML"
                         + (f" ({problem})" if problem else "")) from None
    config = {} if config is None else config
    _require_type(path, "the whole file", config, dict)
    for section in CONFIG_SECTIONS:
        _require_type(path, section, config.get(section), dict)
    for key in ("method", "data.dataset"):
        _require_type(path, key, flatten_keys(config).get(key), str)
    return config


def check_tracking(run_dir) -> None:
    """tracking/ is a folder when it exists (a file there would break every view and every writer)."""
    tracking = run_dir / "tracking"
    if tracking.exists() and not tracking.is_dir():
        raise DamagedRun(f"{tracking}: a file where the tracking folder should be")


def read_run_folder(run_dir) -> tuple[dict[str, Any], dict[str, Any]]:
    """A run folder's (run.json, config.yaml), each checked as above, and its tracking/ checked to be a folder."""
    check_tracking(run_dir)
    return read_run_info(run_dir), read_run_config(run_dir)


def _text(path) -> str:
    try:
        return path.read_text()
    except IsADirectoryError:
        raise DamagedRun(f"{path}: a folder, not a file") from None
    except UnicodeDecodeError:
        raise DamagedRun(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise DamagedRun(f"{path}: cannot be read ({exc.strerror or first_line(exc)})") from None


def _require_type(path, key: str, value, kind) -> None:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if value is None and key != "the whole file" or isinstance(value, kinds) and not (
            isinstance(value, bool) and bool not in kinds):  # JSON true is not a step count
        return
    wanted = " or ".join(JSON_TYPE_NAMES[k] for k in kinds)
    found = JSON_TYPE_NAMES.get(type(value), type(value).__name__)
    raise DamagedRun(f"{path}: {key} is {found}, expected {wanted}")


def checkpoint_file_steps(run_dir) -> list[int]:
    """The steps of the run's `checkpoints/checkpoint-step-NNN.ckpt` files (an untracked run has no checkpoint
    parts, so these are what `runs` counts for it)."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(m[1]) for p in folder.iterdir() if (m := CHECKPOINT_FILE.fullmatch(p.name)))


# ---------------------------------------------------------------------------------------------- is it still running
# A launch records the process that runs it (`processes.this_process`, in run.json's attempt); a reader on the same
# host can tell a run killed outright (SIGKILL, OOM killer, power loss) from one still training. The sweep's workers
# and the scratch folders of runs on object storage use the same record (processes.py).


def duration_seconds(info: dict) -> float | None:
    """Seconds the run's launches trained, summed (a resume's gap not counted): each attempt from started_at to
    ended_at, the last one still running up to now. None when no attempt's times are known (a stale attempt, killed
    without an end time, counts nothing)."""
    total, known = 0.0, False
    attempts = info.get("attempts") or []
    for number, attempt in enumerate(attempts):
        start = _time(attempt.get("started_at"))
        end = _time(attempt.get("ended_at"))
        if end is None and number == len(attempts) - 1 and shown_status(info) == "running":
            end = dt.datetime.now(dt.timezone.utc) if start is not None and start.tzinfo else dt.datetime.now()
        if start is not None and end is not None and (start.tzinfo is None) == (end.tzinfo is None):
            total, known = total + max(0.0, (end - start).total_seconds()), True
    return total if known else None


def _time(text: str | None) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(text) if text else None
    except ValueError:  # a hand-edited time: no duration rather than a failed listing
        return None


def shown_status(info: dict) -> str:
    """run.json's status, except `stale` for a run left `running` whose launch's process on this host is gone (or is
    another process under a reused pid). On another host nobody here can tell: it stays `running`."""
    status = info.get("status") or "unknown"
    process = ((info.get("attempts") or [{}])[-1]).get("process") or {}
    if status == "running" and processes.on_this_host(process) and not processes.alive(process):
        return "stale"
    return status
