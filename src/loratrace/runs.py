"""Run folders: `runs/<dataset>_<method>_<YYYYMMDD_HHMMSS>/`, their `config.yaml` and `run.json`."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from loratrace import storage
from loratrace.config import Config, save_config
from loratrace.run_folders import process_identity, read_run_info

PACKAGES = ("loratrace", "torch", "lightning", "transformers", "peft", "datasets", "swanlab", "pyarrow", "duckdb")


def utc_now() -> dt.datetime:
    """The one clock of every timestamp loratrace writes (run.json, tracking and evaluation rows): aware, UTC."""
    return dt.datetime.now(dt.timezone.utc)


def new_run_dir(cfg: Config, when: dt.datetime | None = None) -> Path:
    """Create a fresh run folder; a name already taken gets a suffix (`_2`, `_3`, ...), never an overwrite. A runs_dir
    on object storage gets a local scratch folder whose files are published there (storage.py)."""
    stamp = (when or dt.datetime.now()).strftime("%Y%m%d_%H%M%S")
    name = f"{cfg.data.dataset}_{cfg.method}_{stamp}"
    if storage.is_remote(cfg.runs_dir):
        candidate = storage.new_staged_run(cfg.runs_dir, name)
        (candidate / "checkpoints").mkdir()
        return candidate
    base = Path(storage.local_form(cfg.runs_dir)) / name
    base.parent.mkdir(parents=True, exist_ok=True)
    candidate, n = base, 1
    while True:
        try:
            candidate.mkdir()
            break
        except FileExistsError:
            n += 1
            candidate = base.with_name(f"{base.name}_{n}")
    (candidate / "checkpoints").mkdir()  # the rest appear when something writes there: no empty folders
    return candidate


def versions() -> dict[str, str | None]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def read_run_json(run_dir: Path) -> dict[str, Any]:
    """run.json, checked by run_folders.read_run_info: a damaged one is one DamagedRun line, not a traceback."""
    return read_run_info(Path(run_dir))


def write_run_json(run_dir: Path, info: dict[str, Any]) -> None:
    path = Path(run_dir) / "run.json"
    tmp = path.with_name(f".run.json.{socket.gethostname()}-{os.getpid()}.partial")  # one per writing process
    tmp.write_text(json.dumps(info, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    storage.publish(path)


def start_run(run_dir: Path, cfg: Config, resumed_from: str | None) -> dict[str, Any]:
    """Write config.yaml and add this launch to run.json's attempts. A resume with a changed config records what
    changed (`config_changes`: key -> [before, now]) in its attempt, and config.yaml then holds the config in force."""
    changes = _config_changes(run_dir / "config.yaml", cfg) if resumed_from else {}
    save_config(cfg, run_dir / "config.yaml")
    storage.publish(run_dir / "config.yaml")
    info = read_run_json(run_dir) or {
        "run_id": run_dir.name, "dataset": cfg.data.dataset, "method": cfg.method,
        "created_at": utc_now().isoformat(timespec="seconds"), "attempts": [],
    }
    info.update(status="running", versions=versions(), git_sha=git_sha(), host=socket.gethostname(),
                python=platform.python_version(), base_model=cfg.model.name)
    info["attempts"].append({"started_at": utc_now().isoformat(timespec="seconds"), "resumed_from": resumed_from,
                             "status": "running", **({"config_changes": changes} if changes else {}),
                             "process": process_identity()})  # so `runs` can tell a killed run: stale
    write_run_json(run_dir, info)
    return info


def finish_run(run_dir: Path, status: str, attempt: dict[str, Any] | None = None, **extra: Any) -> None:
    """Close this launch in run.json: its status, end time and `attempt` facts; `extra` goes on the run."""
    info = read_run_json(run_dir)
    info["status"] = status
    if info.get("attempts"):
        info["attempts"][-1].update(status=status, ended_at=utc_now().isoformat(timespec="seconds"), **(attempt or {}))
    info.update(extra)
    write_run_json(run_dir, info)


def _config_changes(path: Path, cfg: Config) -> dict[str, list]:
    """Dotted keys whose value in `cfg` differs from the config saved at `path`: key -> [saved, now]."""
    import yaml

    from loratrace.overrides import flatten_keys

    try:
        saved = flatten_keys(yaml.safe_load(path.read_text()) or {})
    except (OSError, ValueError):
        return {}
    current = flatten_keys(cfg.to_dict())
    return {key: [saved.get(key), value] for key, value in current.items() if saved.get(key) != value}
