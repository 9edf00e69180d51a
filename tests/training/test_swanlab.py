"""SwanLab: the run summary names the command that shows a run in the mode it was written in, and the README's
`swanlab watch` serves a local-mode run's loss, step for step, from SwanLab's own dashboard."""

import json
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT, run_cli
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from loratrace.config import load_config
from loratrace.recipe import print_summary

WATCH = re.search(r"^swanlab watch (\S+)", (ROOT / "README.md").read_text(), re.M)


def summary_line(capsys, run_dir: Path, *overrides: str) -> str | None:
    print_summary(load_config(None, list(overrides)), run_dir, 3, 1.0, [])
    return next((line for line in capsys.readouterr().out.splitlines() if line.startswith("swanlab")), None)


def test_summary_names_what_works_for_each_mode(capsys, tmp_path):
    run_dir = tmp_path / "arc-challenge_lora_20260101_000000"
    logs = run_dir / "swanlab_logs"
    assert summary_line(capsys, run_dir, "logging.swanlab_mode=local").split()[1:4] == ["swanlab", "watch", str(logs)]
    offline = summary_line(capsys, run_dir, "logging.swanlab_mode=offline")
    assert offline.split()[1:4] == ["swanlab", "sync", f"{logs}/run-*"] and "logging.swanlab_mode=local" in offline
    assert "swanlab watch" not in offline  # offline files cannot be watched: the dashboard's API answers 500
    cloud = summary_line(capsys, run_dir, "logging.swanlab_mode=cloud", "logging.project=arc-study")
    assert "arc-study" in cloud and "SwanLab cloud" in cloud
    assert summary_line(capsys, run_dir, "logging.swanlab_mode=disabled") is None
    assert summary_line(capsys, run_dir, "logging.swanlab=false") is None


def test_offline_sync_path_names_the_runs_swanlab_folders(default_run):
    """The offline summary's `swanlab_logs/run-*` expands to SwanLab's run folders, each with its .swanlab file."""
    folders = list((default_run / "swanlab_logs").glob("run-*"))
    assert folders and all(p.is_dir() and list(p.glob("*.swanlab")) for p in folders)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.loads(response.read())
    assert body["code"] == 0, body
    return body["data"]


def test_swanlab_watch_serves_a_local_runs_loss(tmp_path):
    assert WATCH, "README: no `swanlab watch runs/<run>/swanlab_logs` command"
    trained = run_cli("train", "--config", str(ROOT / "configs" / "tiny.yaml"), "training.max_steps=6",
                      "training.stage1_steps=3", "logging.swanlab_mode=local", "--runs-dir", str(tmp_path),
                      cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-2000:]
    run_dir = next(p for p in tmp_path.iterdir() if (p / "run.json").exists())
    printed = next(line for line in trained.stdout.splitlines() if line.startswith("swanlab "))
    command = shlex.split(printed.split("   (")[0])[1:]
    readme = shlex.split("swanlab watch " + WATCH[1].replace("runs/<run>", str(run_dir)))
    assert command == readme == ["swanlab", "watch", str(run_dir / "swanlab_logs")]

    port = free_port()
    log = tmp_path / "watch.log"
    server = subprocess.Popen([sys.executable, "-m", *command, "--host", "127.0.0.1", "--port", str(port)],
                              stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}/api/v1"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                project = get_json(f"{base}/project")
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"swanlab watch did not serve on port {port}: {log.read_text()[-2000:]}")
                time.sleep(0.5)
        experiment = next(e for e in project["experiments"] if e["name"] == run_dir.name)
        served = get_json(f"{base}/experiment/{experiment['id']}/tag/train%2Floss")["list"]
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()

    events = EventAccumulator(str(run_dir / "tensorboard_logs"))
    events.Reload()
    tensorboard = {e.step: e.value for e in events.Scalars("train/loss")}
    batches = pd.read_parquet(run_dir / "tracking" / "batches")
    per_step = (batches.loss * batches.n_target_tokens).groupby(batches.step).sum() / \
        batches.n_target_tokens.groupby(batches.step).sum()
    assert [point["index"] for point in served] == sorted(tensorboard) == list(per_step.index) == list(range(1, 7))
    values = [point["data"] for point in served]
    assert values == pytest.approx([tensorboard[s] for s in range(1, 7)], rel=1e-6)
    assert values == pytest.approx(list(per_step), rel=1e-5)


def test_each_run_of_one_command_has_its_own_swanlab_run(tmp_path):
    """`--dataset A --dataset B` trains two runs in one process: each one's metrics go to its own swanlab_logs/."""
    result = run_cli("train", "--config", str(ROOT / "configs" / "tiny.yaml"), "training.max_steps=2",
                     "training.stage1_steps=1", "--dataset", "arc-challenge", "--dataset", "arc-easy", "--runs-dir",
                     str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    runs = sorted(p for p in tmp_path.iterdir() if (p / "run.json").exists())
    assert [p.name.split("_")[0] for p in runs] == ["arc-challenge", "arc-easy"]
    assert [bool(list((p / "swanlab_logs").rglob("*.swanlab"))) for p in runs] == [True, True]
