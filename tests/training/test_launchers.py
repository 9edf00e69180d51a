"""One run folder per run whatever starts the processes: torchrun (one node, two nodes), SLURM's srun (its
environment, set on two processes as srun sets it), and the resume rules across them. Every process is a real
`loratrace train` on the tiny preset, gloo on the CPU."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
from conftest import ROOT, run_cli

import loratrace
from loratrace.config import ConfigError, load_config
from loratrace.data.loader import EpochLoader
from loratrace.runs.folder import read_run_json, write_run_json
from loratrace.training.launch import identify

BATCH, STEPS = 4, 12
TRAIN = ["-m", "loratrace", "train", "--config", str(ROOT / "configs" / "tiny.yaml"), "--track-batches"]
SETTINGS = ["training.accelerator=cpu", f"training.batch_size={BATCH}", f"training.max_steps={STEPS}",
         "training.stage1_steps=4", "logging.swanlab=false", "logging.tensorboard=false", "lora.dropout=0.2"]
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                      "MASTER_PORT", "TORCHELASTIC_RUN_ID", "NODE_RANK", "LORATRACE_RUN_DIR")


def clean_environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES and not k.startswith("SLURM_")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(launcher: list[str], command: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launcher, *command]


def start(command: list[str], folder: Path, log: Path, **env: str) -> subprocess.Popen:
    """A process whose stderr (progress bars included) goes to `log`: a pipe nobody reads would stall it."""
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, cwd=folder, env=clean_environment(**env), stdout=subprocess.DEVNULL,
                                   stderr=stderr, text=True)
    process.log = log
    return process


def finish(processes: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str]]:
    """(exit code, the end of stderr) of each process, once it has ended."""
    for process in processes:
        process.wait(timeout=timeout)
    return [(process.returncode, process.log.read_text()[-3000:]) for process in processes]


def run_folders(runs_dir: Path) -> list[Path]:
    return sorted(p for p in runs_dir.iterdir() if p.is_dir())


def effective(run_dir: Path) -> pd.DataFrame:
    with loratrace.open_runs([run_dir]) as db:
        return db.sql("SELECT step, rank, micro_batch, example_ids, lines, losses FROM batches "
                      "ORDER BY step, rank, micro_batch").df()


@pytest.fixture(scope="module")
def standalone(tmp_path_factory) -> Path:
    """`torchrun --standalone --nproc_per_node 2`, uninterrupted: the reference every other launch is held to."""
    runs_dir = tmp_path_factory.mktemp("standalone")
    process = start(torchrun(["--standalone", "--nproc_per_node", "2"], [*TRAIN, f"--runs-dir={runs_dir}", *SETTINGS,
                                                                         "training.devices=2"]),
                    runs_dir, runs_dir.parent / "standalone.log")
    ((code, err),) = finish([process])
    assert code == 0, err
    (run,) = run_folders(runs_dir)
    return run


@pytest.mark.slow
def test_torchrun_one_node_writes_one_run_whose_steps_are_the_global_batches(standalone):
    run = standalone
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and len(info["attempts"]) == 1  # rank 0 alone wrote it, once
    assert not list(run.glob("*.partial")) and not list(run.glob(".*.partial"))
    assert (run / "config.yaml").is_file() and (run / "final_adapter" / "adapter_model.safetensors").is_file()
    parts = sorted(p.name.split("-")[1] for p in (run / "tracking" / "batches").iterdir())
    assert set(parts) == {"r00", "r01"}  # every rank its own parts
    rows = effective(run)
    assert sorted(rows["rank"].unique()) == [0, 1] and sorted(rows.step.unique()) == list(range(1, STEPS + 1))
    # The data order of the run's sampler, one process taking the whole global batch (2 x BATCH) per step.
    examples = pd.read_parquet(run / "tracking" / "examples.parquet")
    order = EpochLoader(list(range(len(examples))), 2 * BATCH, seed=42, pad_id=0)._draw_batches(0)
    for step, group in rows.groupby("step"):
        trained = sorted(line for lines in group.lines for line in lines)
        assert trained == sorted(examples.line[i] for i in order[step - 1]), step
    attempts = pd.read_parquet(run / "tracking" / "attempts")
    assert attempts.world_size.tolist() == [2]


@pytest.mark.slow
def test_two_torchrun_nodes_killed_mid_run_resume_to_the_uninterrupted_rows(standalone, tmp_path):
    """Two node processes (rendezvous on 127.0.0.1) make one run folder; SIGKILL of the whole job, then a resume
    under `torchrun --standalone` (the same world size, 2) reads as the uninterrupted run."""
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    node = ["--nnodes", "2", "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    command = [*TRAIN, f"--runs-dir={runs_dir}", *SETTINGS, "training.devices=1", "training.num_nodes=2"]
    nodes = [start(torchrun([*node, "--node_rank", str(rank)], command), runs_dir, tmp_path / f"node{rank}.log")
             for rank in (0, 1)]
    deadline = time.time() + 240
    while not list(runs_dir.glob("*/checkpoints/checkpoint-step-006.ckpt")) and time.time() < deadline:
        assert all(n.poll() is None for n in nodes), finish(nodes)
        time.sleep(0.02)
    job = [psutil.Process(n.pid) for n in nodes]
    job += [child for process in list(job) for child in process.children(recursive=True)]
    for process in job:  # the whole job: both launchers and their workers
        process.send_signal(signal.SIGKILL)
    for n in nodes:
        n.communicate(timeout=60)
    (run,) = run_folders(runs_dir)
    assert not (run / "checkpoints" / f"checkpoint-step-{STEPS:03d}.ckpt").exists(), "killed after the end"
    assert json.loads((run / "run.json").read_text())["status"] == "running"  # killed: nobody closed it
    last = sorted((run / "checkpoints").glob("checkpoint-step-*.ckpt"))[-1]

    resume = start(torchrun(["--standalone", "--nproc_per_node", "2"], [
        "-m", "loratrace", "train", "--resume-from-checkpoint", str(last), "training.devices=2",
        "training.num_nodes=1"]), runs_dir, tmp_path / "resume.log")
    ((code, err),) = finish([resume])
    assert code == 0, err
    assert run_folders(runs_dir) == [run]
    got, want = effective(run), effective(standalone)
    assert got[["step", "rank", "micro_batch"]].values.tolist() == want[["step", "rank", "micro_batch"]].values.tolist()
    assert [list(x) for x in got.example_ids] == [list(x) for x in want.example_ids]
    assert [list(x) for x in got.lines] == [list(x) for x in want.lines]
    for a, b in zip(got.losses, want.losses):
        assert list(a) == pytest.approx(list(b), rel=1e-4, abs=1e-5)
    info = json.loads((run / "run.json").read_text())
    assert [a["status"] for a in info["attempts"]] == ["running", "completed"]


@pytest.mark.slow
def test_srun_environment_two_tasks_write_one_run(tmp_path):
    """Two processes with the variables `srun --ntasks-per-node=2` sets, read by Lightning's SLURMEnvironment."""
    slurm = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
             "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "loratrace", "SLURM_NODELIST": "127.0.0.1",
             "MASTER_PORT": str(free_port())}
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    command = [sys.executable, *TRAIN, f"--runs-dir={runs_dir}", *SETTINGS, "training.devices=2",
               "training.max_steps=3", "training.stage1_steps=1", "export.merged_model=false"]
    tasks = [start(command, runs_dir, tmp_path / f"task{rank}.log", **slurm, SLURM_PROCID=str(rank),
                   SLURM_LOCALID=str(rank)) for rank in (0, 1)]
    for code, err in finish(tasks):
        assert code == 0, err
    (run,) = run_folders(runs_dir)
    rows = effective(run)
    assert sorted(rows["rank"].unique()) == [0, 1] and sorted(rows.step.unique()) == [1, 2, 3]
    assert pd.read_parquet(run / "tracking" / "attempts").world_size.tolist() == [2]


@pytest.mark.slow
def test_resume_under_another_world_size_is_refused_and_changes_nothing(standalone):
    run = standalone
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    result = run_cli("train", "--resume-from-checkpoint", str(run / "checkpoints" / "checkpoint-step-008.ckpt"),
                     "training.devices=1", cwd=run.parent)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "trained by 2 process(es), not 1" in lines[-1], result.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


TORCHRUN_NODE_1 = {"RANK": "3", "LOCAL_RANK": "1", "GROUP_RANK": "1", "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "4",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999", "TORCHELASTIC_RUN_ID": "none"}


def test_rank_and_world_size_are_the_launchers(monkeypatch):
    """What torchrun sets on the second process of the second node: Lightning's numbering, no process started."""
    for key in LAUNCHER_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    for key, value in TORCHRUN_NODE_1.items():
        monkeypatch.setenv(key, value)
    cpu = ["training.accelerator=cpu", "training.devices=2"]
    launch = identify(load_config(None, [*cpu, "training.num_nodes=2"]))
    assert (launch.rank, launch.world_size, launch.external) == (3, 4, True)
    with pytest.raises(ConfigError, match=r"devices=2, num_nodes=1.*does not match the world size \(4\)"):
        identify(load_config(None, cpu))
    with pytest.raises(ConfigError, match=r"torchrun started 4 processes, but training.devices=1 x training.num_nodes"
                                          r"=1 is 1: set training.devices to the processes per node"):
        identify(load_config(None, ["training.accelerator=cpu"]))  # each would train alone, in a folder of its own


def test_several_nodes_without_an_external_launcher_is_one_line(monkeypatch):
    for key in LAUNCHER_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ConfigError, match="training.num_nodes=2: start the processes on every node with torchrun"):
        identify(load_config(None, ["training.accelerator=cpu", "training.devices=2", "training.num_nodes=2"]))


def _write_run_json_repeatedly(run_dir: str, rank: int) -> None:
    for n in range(200):
        write_run_json(Path(run_dir), {"rank": rank, "n": n})


def test_processes_writing_run_json_at_once_never_collide(tmp_path):
    """Each writer has its own temporary name: one never renames another's half-written file (or finds it gone)."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_write_run_json_repeatedly, args=(str(tmp_path), rank)) for rank in (0, 1)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
    assert [w.exitcode for w in writers] == [0, 0]
    assert read_run_json(tmp_path)["n"] == 199 and list(tmp_path.iterdir()) == [tmp_path / "run.json"]
