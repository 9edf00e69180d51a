"""Shared fixtures: small tracked runs of the tiny preset, trained once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A small run: 400 sample rows / batch 8 = 50 batches an epoch; stage 2 checkpoints every update.
SMALL = ["training.batch_size=8", "training.max_steps=16", "training.stage1_steps=8", "logging.swanlab=false",
         "tracking.enabled=true", "tracking.flush_every_steps=4"]


def small_config(runs_dir: Path, *extra: str):
    from loratrace.config import load_config

    return load_config(ROOT / "configs" / "tiny.yaml", [*SMALL, f"runs_dir={runs_dir}", *extra])


def run_cli(*args: str, cwd: Path | None = None, stdin: str | None = None, timeout: int = 3600):
    """The installed console entry point, as a user runs it (`timeout` only stops a hung command)."""
    return subprocess.run([sys.executable, "-m", "loratrace", *args], capture_output=True, text=True, cwd=cwd,
                          input=stdin, timeout=timeout)


def train_then_signal(runs_dir: Path, args: list[str], signum: int, timeout: int = 120):
    """`loratrace train ARGS --runs-dir RUNS_DIR` as a subprocess, sent `signum` once its first tracking part is
    flushed (some steps are done): (exit code, stdout, stderr). `timeout` bounds the start and the stop each."""
    import time

    process = subprocess.Popen([sys.executable, "-m", "loratrace", "train", *args, f"--runs-dir={runs_dir}"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        while not list(Path(runs_dir).glob("*/tracking/batches/*.parquet")):
            assert time.monotonic() < deadline and process.poll() is None, "training did not start"
            time.sleep(0.2)
        process.send_signal(signum)
        out, err = process.communicate(timeout=timeout)
    finally:
        process.kill()
    return process.returncode, out, err


@pytest.fixture(scope="session")
def default_run(tmp_path_factory) -> Path:
    """The embedded default job (125 updates, 50 checkpoints), tracked, SwanLab offline: trained once."""
    import loratrace
    from loratrace.config import load_config

    runs_dir = tmp_path_factory.mktemp("default-runs")
    cfg = load_config(None, ["tracking.enabled=true", f"runs_dir={runs_dir}"])
    return loratrace.train(cfg, progress=False)


@pytest.fixture(scope="session")
def small_run(tmp_path_factory) -> Path:
    import loratrace

    return loratrace.train(small_config(tmp_path_factory.mktemp("small-runs")), progress=False)


@pytest.fixture(scope="session")
def legacy_folder(tmp_path_factory) -> Path:
    """The traditional script's folder (legacy_script.py), written once per session."""
    from legacy_script import write_legacy_run

    return write_legacy_run(tmp_path_factory.mktemp("legacy") / "experiments")


@pytest.fixture
def legacy_copy(legacy_folder, tmp_path) -> Path:
    """A copy of the legacy folder under the same name, to damage the way real folders are damaged."""
    import shutil

    copy = tmp_path / "experiments" / legacy_folder.name
    shutil.copytree(legacy_folder, copy)
    return copy
