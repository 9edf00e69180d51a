"""Run folders as the query layer finds them (`find_runs`) and the facts of the `runs` view (`runs_info`): run.json
and every run's config.yaml flattened, a key any run has being a column.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Any

import yaml

from loratrace.errors import LoratraceError
from loratrace.overrides import flatten_keys

RUN_COLUMNS = ("run_id", "dir", "dataset", "method", "created_at", "status")  # then every run's config, flattened
SWEEP_COLUMNS = ("study", "trial")  # from a sweep trial's run.json: columns once any run has them


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


def runs_info(run_dirs: list[Path]) -> tuple[list[str], list[list[str | None]]]:
    """Column names and rows, one per run: its run.json facts and its config flattened, every value a string or
    NULL (a config key any run has is a column; the other runs' value is NULL)."""
    rows = []
    for run_dir in run_dirs:
        info = _read_json(run_dir / "run.json")
        config = _read_yaml(run_dir / "config.yaml")
        rows.append({
            **_config_columns(config),
            "run_id": info.get("run_id", run_dir.name), "dir": str(run_dir),
            "dataset": info.get("dataset", config.get("data", {}).get("dataset")),
            "method": info.get("method", config.get("method")),
            "created_at": info.get("created_at"), "status": info.get("status", "unknown"),
            **{key: info[key] for key in SWEEP_COLUMNS if key in info},
        })
    columns = list(dict.fromkeys([*RUN_COLUMNS, *(key for row in rows for key in row)]))
    return columns, [[None if row.get(c) is None else str(row[c]) for c in columns] for row in rows]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _read_yaml(path: Path) -> dict:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
