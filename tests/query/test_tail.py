"""`loratrace tail`: a finished run's last steps, the same through s3://, one-line errors, no torch; and `--follow`
on a short training in another process (each step once, in order, while it trains; ends with the run), whose stderr
(a file) holds progress lines and no bar frames, and whose stage boundary follows its max_steps."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import run_cli
from test_storage import BUCKET, s3  # noqa: F401 - the moto S3 server fixture

import loratrace


def _json_rows(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def test_tail_prints_the_last_steps_as_the_views_hold_them(small_run):
    result = run_cli("tail", str(small_run), "-n", "3", "--format", "json")
    assert result.returncode == 0, result.stderr
    rows = _json_rows(result.stdout)
    with loratrace.open_runs(small_run) as db:
        last = db.sql("SELECT max(step) FROM batches").fetchall()[0][0]
        loss = dict(db.sql("SELECT step, value FROM metrics WHERE name = 'train/loss'").fetchall())
        ids = dict(db.sql("SELECT step, flatten(list(example_ids ORDER BY micro_batch)) FROM batches "
                          "GROUP BY step").fetchall())
        grad = dict(db.sql("SELECT step, max(grad_norm) FROM batches GROUP BY step").fetchall())
    assert [r["step"] for r in rows] == [last - 2, last - 1, last]
    for row in rows:
        assert row["loss"] == pytest.approx(loss[row["step"]], rel=1e-6)
        assert row["example_ids"] == ids[row["step"]] and row["examples"] == len(ids[row["step"]])
        assert row["grad_norm"] == pytest.approx(grad[row["step"]]) and row["stage"] == 2
    table = run_cli("tail", str(small_run), "-n", "2")
    lines = table.stdout.splitlines()
    assert table.returncode == 0 and lines[0].split() == ["step", "stage", "loss", "grad_norm", "lr", "examples",
                                                          "members"]
    first = rows[1]
    assert lines[1].split()[:2] == [str(first["step"]), "2"] and f"{first['loss']:.4f}" in lines[1]
    assert lines[1].endswith(f"+{first['examples'] - 3}") and first["example_ids"][0] in lines[1]
    assert len(lines) == 3
    follow = run_cli("tail", str(small_run.parent), "--follow", "-n", "1", "--format", "json", timeout=60)
    assert follow.returncode == 0 and [r["step"] for r in _json_rows(follow.stdout)] == [last]  # a finished run: ends


def test_tail_reads_a_run_on_s3_as_it_reads_it_here(s3, small_run):  # noqa: F811
    prefix = f"tail/runs/{small_run.name}"
    for path in small_run.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(small_run).as_posix()}")
    here = run_cli("tail", str(small_run), "-n", "4", "--format", "json")
    there = run_cli("tail", f"s3://{BUCKET}/{prefix}", "-n", "4", "--format", "json", timeout=120)  # the AWS_* of s3
    assert there.returncode == 0, there.stderr
    assert _json_rows(there.stdout) == _json_rows(here.stdout) and len(_json_rows(here.stdout)) == 4


def test_tail_imports_neither_torch_nor_pandas(small_run):
    code = ("import sys; from loratrace.cli import main; main(['tail', sys.argv[1], '--format', 'json']); "
            "assert not {'torch', 'transformers', 'pandas'} & set(sys.modules), 'heavy import'")
    result = subprocess.run([sys.executable, "-c", code, str(small_run)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_tail_errors_are_one_line(small_run, tmp_path):
    untracked = tmp_path / "runs" / "untracked"
    untracked.mkdir(parents=True)
    shutil.copy(small_run / "run.json", untracked / "run.json")
    config = (small_run / "config.yaml").read_text()
    (untracked / "config.yaml").write_text(config.replace("tracking:\n  enabled: true", "tracking:\n  enabled: false"))
    for args, message in [((str(tmp_path / "nope"),), "is not a run folder or a folder of runs"),
                          ((str(untracked),), "was trained without batch tracking")]:
        result = run_cli("tail", *args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1 and message in lines[0], result.stderr
        assert result.stdout == ""
    assert sorted(p.name for p in untracked.iterdir()) == ["config.yaml", "run.json"]  # a reader writes nothing


def _lines_as_they_come(process: subprocess.Popen, sink: list, training: subprocess.Popen) -> threading.Thread:
    """Read a process's stdout on a thread: (whether `training` was still running when it came, line) per line."""
    def read() -> None:
        for line in process.stdout:
            sink.append((training.poll() is None, line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return reader


@pytest.mark.slow
def _ctrl_c_while_following(tmp_path, run, command) -> None:
    """Ctrl+C while `tail --follow` waits on a run that is still training: a copy of `run` whose run.json says
    running, recorded as this (live) test process, so the run cannot end by itself before the signal arrives."""
    from loratrace.runs.processes import this_process

    live = tmp_path / "live" / run.name
    shutil.copytree(run, live)
    info = json.loads((live / "run.json").read_text())
    info["status"] = info["attempts"][-1]["status"] = "running"
    info["attempts"][-1].pop("ended_at", None)
    info["attempts"][-1]["process"] = this_process()
    (live / "run.json").write_text(json.dumps(info))
    follow = [*command[:4], str(live.parent), *command[5:-2], "--poll", "0.5"]
    interrupted = subprocess.Popen(follow, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = interrupted.stdout.readline()  # the last steps first, then it waits for more
        assert json.loads(first)["step"] == 1 and interrupted.poll() is None
        interrupted.send_signal(signal.SIGINT)
        assert interrupted.wait(60) == 130
        assert interrupted.stderr.read().strip().splitlines() == ["loratrace: error: interrupted"]
    finally:
        interrupted.kill()


def test_tail_follows_a_short_training_in_another_process(tmp_path):
    """8 steps of the embedded default with no stage1_steps given (so 4 + 4), a part per step, stderr to a file."""
    runs, stderr = tmp_path / "runs", tmp_path / "train.stderr"
    args = ["train", f"--runs-dir={runs}", "training.batch_size=4", "training.max_steps=8", "logging.swanlab=false",
            "export.merged_model=false", "export.adapter=false", "tracking.enabled=true",
            "tracking.flush_every_steps=1", "logging.progress_every_n_steps=3"]
    with open(stderr, "w") as err:
        training = subprocess.Popen([sys.executable, "-m", "loratrace", *args], stdout=subprocess.DEVNULL,
                                    stderr=err, cwd=tmp_path)
    started = [training]
    try:
        deadline = time.monotonic() + 300
        while not list(runs.glob("*/run.json")):
            assert training.poll() is None and time.monotonic() < deadline, stderr.read_text()[-2000:]
            time.sleep(0.2)
        command = [sys.executable, "-m", "loratrace", "tail", str(runs), "--follow", "-n", "100", "--format", "json",
                   "--poll", "0.2"]
        tail = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started.append(tail)
        arrived: list = []
        reader = _lines_as_they_come(tail, arrived, training)
        assert tail.wait(300) == 0, tail.stderr.read()  # it ended by itself: the run left `running`
        reader.join(10)
        assert training.wait(300) == 0, stderr.read_text()[-2000:]
        _ctrl_c_while_following(tmp_path, next(runs.iterdir()), command)
    finally:
        for process in started:
            process.kill()
    rows = [json.loads(line) for _, line in arrived]
    assert [r["step"] for r in rows] == list(range(1, 9))  # each step once, in order
    assert [r["stage"] for r in rows] == [1] * 4 + [2] * 4  # max_steps=8 alone: stage 1 is 8 * 75 // 125 = 4 steps
    run = next(runs.iterdir())
    assert json.loads((run / "run.json").read_text())["status"] == "completed"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"checkpoint-step-00{s}.ckpt" for s in
                                                                       range(5, 9)]
    assert arrived[0][0], "the first step showed only once the training had ended"
    text = stderr.read_text()
    assert "\r" not in text  # no bar frames in a log file
    progress = [line for line in text.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in progress] == ["3/8", "6/8", "8/8"]
    assert all(" loss " in line and " s/step" in line for line in progress)
    assert "note: training.stage1_steps = 4" in text
