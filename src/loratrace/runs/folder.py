"""Run folders: `runs/<dataset>_<method>_<YYYYMMDD_HHMMSS>/`, their `config.yaml` and `run.json`."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import platform
import re
import socket
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from loratrace.config import Config, save_config
from loratrace.errors import LoratraceError
from loratrace.overrides import flatten_keys
from loratrace.runs import storage
from loratrace.runs.find import read_run_info
from loratrace.runs.processes import this_process

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
    """Always valid JSON: a non-finite number (a diverged loss, say) is written as null, never as NaN/Infinity, which
    JSON has not and strict readers (DuckDB, jq, JavaScript) refuse."""
    path = Path(run_dir) / "run.json"
    tmp = path.with_name(f".run.json.{socket.gethostname()}-{os.getpid()}.partial")  # one per writing process
    tmp.write_text(json.dumps(_finite(info), indent=2, default=str, allow_nan=False) + "\n")
    os.replace(tmp, path)
    storage.publish(path)


def _finite(value: Any) -> Any:
    """`value` with every non-finite float (at any depth) replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def start_run(run_dir: Path, cfg: Config, resumed_from: str | None, resumed_step: int | None = None) -> dict[str, Any]:
    """Write config.yaml and add this launch to run.json's attempts (a resume's with the step it went back to). A
    resume with a changed config records what changed (`config_changes`: key -> [before, now]) in its attempt, and
    config.yaml then holds the config in force."""
    changes = _config_changes(run_dir / "config.yaml", cfg) if resumed_from else {}
    save_config(cfg, run_dir / "config.yaml")
    storage.publish(run_dir / "config.yaml")
    info = read_run_json(run_dir) or {
        "run_id": run_dir.name, "dataset": cfg.data.dataset, "method": cfg.method,
        "created_at": utc_now().isoformat(timespec="seconds"), "attempts": [],
    }
    info.update(status="running", versions=versions(), git_sha=git_sha(), host=socket.gethostname(),
                python=platform.python_version(), base_model=cfg.model.name,
                name=cfg.run.name or None, tags=list(cfg.run.tags))  # a resume may rename or retag the run
    info["attempts"].append({"started_at": utc_now().isoformat(timespec="milliseconds"), "resumed_from": resumed_from,
                             **({"resumed_step": resumed_step} if resumed_from else {}),
                             "status": "running", **({"config_changes": changes} if changes else {}),
                             "process": this_process()})  # so `runs` can tell a killed run: stale
    write_run_json(run_dir, info)
    return info


def finish_run(run_dir: Path, status: str, attempt: dict[str, Any] | None = None,
               final_export_step: int | None = None, **extra: Any) -> None:
    """Close this launch in run.json: its status, end time and `attempt` facts; `extra` goes on the run;
    `final_export_step`: this launch wrote final_* at that step (`final_export`)."""
    info = read_run_json(run_dir)
    if final_export_step is not None:  # final_* written by this launch, the last attempt in run.json
        info["final_export"] = {"attempt": len(info.get("attempts") or []) - 1, "step": final_export_step}
    info["status"] = status
    if info.get("attempts"):
        ended = utc_now().isoformat(timespec="milliseconds")  # milliseconds: a 3-step run can end within its second
        info["attempts"][-1].update(status=status, ended_at=ended, **(attempt or {}))
    info.update(extra)
    write_run_json(run_dir, info)


def _config_changes(path: Path, cfg: Config) -> dict[str, list]:
    """Dotted keys whose value in `cfg` differs from the config saved at `path`: key -> [saved, now]."""
    try:
        saved = flatten_keys(yaml.safe_load(path.read_text()) or {})
    except (OSError, ValueError):
        return {}
    current = flatten_keys(cfg.to_dict())
    return {key: [saved.get(key), value] for key, value in current.items() if saved.get(key) != value}


# ---------------------------------------------------------------------------------------------- one trainer per run

LOCK_FILE = ".train.lock"
"""Held (an fcntl lock, which dies with its process: a crashed trainer leaves no stale lock) by the process training
the run; it holds the holder's host and pid for the refusal line, and is removed when training ends."""


class RunBusy(LoratraceError):
    """A run another process is training: two launches would both become the same attempt and overwrite each other's
    parts and checkpoints."""


@contextlib.contextmanager
def training_lock(run_dir: Path):
    """Hold the run's training lock for the block, or refuse at once (RunBusy) naming the holder."""
    from filelock import FileLock, Timeout

    path = Path(run_dir) / LOCK_FILE
    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunBusy(f"{run_dir} is being trained by another process ({_lock_holder(path)}); wait for it to end, "
                      "or stop it first") from None
    try:
        path.write_text(f"host {socket.gethostname()} pid {os.getpid()}\n")
        yield
    finally:
        path.unlink(missing_ok=True)  # before the release: a process that opened the file meanwhile sees it unlinked
        lock.release()


def _lock_holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "holder not known yet"
    except OSError:
        return "holder not known"


# ---------------------------------------------------------------------------------------------- the final model

def final_export(info: dict[str, Any]) -> tuple[int | None, str | None]:
    """(step, None) when final_model/ and final_adapter/ are the run's final weights, at that step; else (None, why
    not). They are written by a completed attempt (run.json's `final_export`: attempt, step); a later attempt that
    resumed from an earlier step abandoned them, whether or not it completed. run.json written before `final_export`
    existed: the exports are final when the last attempt completed."""
    attempts = info.get("attempts") or []
    exported = info.get("final_export")
    if not isinstance(exported, dict):
        if attempts and attempts[-1].get("status") == "completed":
            return info.get("steps"), None
        completed = [n for n, attempt in enumerate(attempts) if attempt.get("status") == "completed"]
        if completed:
            return None, (f"final_model is from attempt {completed[-1]}, and attempt {len(attempts) - 1} resumed the "
                          f"run since ({attempts[-1].get('status')}); evaluate its checkpoints instead")
        return None, "no attempt of this run completed, so it has no final_model; evaluate its checkpoints instead"
    attempt, step = int(exported["attempt"]), int(exported["step"])
    for later, resumed in enumerate(attempts[attempt + 1:], start=attempt + 1):
        went_back_to = _resumed_step(resumed)
        if went_back_to is not None and went_back_to < step:
            return None, (f"final_model is from abandoned attempt {attempt} (step {step}): attempt {later} resumed "
                          f"from step {went_back_to}; evaluate its checkpoints instead")
    return step, None


def _resumed_step(attempt: dict[str, Any]) -> int | None:
    """The step an attempt resumed from: recorded, or read off the checkpoint's name (run.json before it was)."""
    if attempt.get("resumed_step") is not None:
        return int(attempt["resumed_step"])
    found = re.search(r"checkpoint-step-(\d+)\.ckpt$", str(attempt.get("resumed_from") or ""))
    return int(found.group(1)) if found else None
