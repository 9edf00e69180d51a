"""Runs on object storage: a tracked run written to moto's S3 server (started here, on 127.0.0.1), read back by
`query`, `trace`, `runs` and `eval`, with a reader polling while it trains; credentials missing; a `s3://` path never
taken for a local folder."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import small_config

from loratrace import cli

BUCKET = "lab-bucket"
RUNS = f"s3://{BUCKET}/loratrace/runs"
NO_CREDENTIALS = {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_SESSION_TOKEN": None,
                  "AWS_PROFILE": None, "AWS_EC2_METADATA_DISABLED": "true",
                  "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/credentials", "AWS_CONFIG_FILE": "/nonexistent/config"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on a free port of 127.0.0.1 with one bucket; the AWS_* variables point every client at it."""
    pytest.importorskip("s3fs")
    server_module = pytest.importorskip("moto.server")
    import boto3

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = _free_port()
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    with pytest.MonkeyPatch.context() as env:
        for key, value in {**NO_CREDENTIALS, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
            env.setenv(key, value) if value is not None else env.delenv(key, raising=False)
        client = boto3.client("s3")
        deadline = time.monotonic() + 20
        while True:  # the server thread answers within moments; bounded all the same
            try:
                client.create_bucket(Bucket=BUCKET)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield client
    server.stop()


def _keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


@pytest.fixture(scope="module")
def remote_run(s3):
    """A tracked tiny run trained straight to s3://, while a reader polls the runs location with the CLI's
    read-only connection: (run URL, what the reader saw)."""
    import loratrace
    from loratrace.query.store import open_runs
    from loratrace.runs.find import RunsNotFound

    done, seen, failures = threading.Event(), [], []

    def poll() -> None:
        last = False
        while not last:
            last = done.is_set()  # one more poll once the run has ended: it must see every row
            try:
                with open_runs(RUNS, read_only=True) as db:
                    seen.append(db.fetch_table("SELECT count(*) AS n FROM samples")["n"][0].as_py())
                    failures.extend(db._reported)  # a part the views had to skip: unreadable, i.e. half an object
            except RunsNotFound:
                if seen:
                    failures.append("the run disappeared")
            except Exception as error:  # noqa: BLE001 - any failure of the reader is the finding
                failures.append(repr(error))
            done.wait(0.2)  # a reader every fifth of a second, not one spinning on the GIL against the training

    reader = threading.Thread(target=poll)
    reader.start()
    try:
        url = loratrace.train(small_config(RUNS, "tracking.flush_every_steps=2", "checkpoint.stage1_every_n_steps=2"),
                              progress=False)
    finally:
        done.set()
        reader.join(60)
    return url, seen, failures


def test_a_tracked_run_lands_on_s3_as_it_is_written(s3, remote_run, tmp_path):
    url, _, _ = remote_run
    assert isinstance(url, str) and url.startswith(RUNS + "/arc-challenge_lora_")
    prefix = url.removeprefix(f"s3://{BUCKET}/") + "/"
    keys = [k.removeprefix(prefix) for k in _keys(s3, prefix)]
    for expected in ("run.json", "config.yaml", "checkpoints/checkpoint-step-002.ckpt",
                     "checkpoints/checkpoint-step-016.ckpt", "tracking/batches/a000-r00-000000.parquet",
                     "tracking/attempts/a000.parquet", "tracking/examples.parquet", "tracking/samples_index.parquet",
                     "tracking/step_checkpoint.parquet", "tracking/line_checkpoint.parquet",
                     "final_adapter/adapter_model.safetensors", "final_model/model.safetensors",
                     "base_model/model.safetensors"):
        assert expected in keys, keys
    assert any(k.startswith("tensorboard_logs/events.out.tfevents") for k in keys)
    assert not [k for k in keys if ".tmp-" in k or k.endswith(".partial")]
    info = json.loads(s3.get_object(Bucket=BUCKET, Key=prefix + "run.json")["Body"].read())
    assert info["status"] == "completed" and info["checkpoints"] == 12  # steps 2, 4, 6, 8, then 9 to 16


def test_a_reader_polling_during_the_run_never_fails(remote_run):
    _, seen, failures = remote_run
    assert failures == []
    assert len(seen) >= 3 and seen == sorted(seen) and seen[-1] == 16 * 8  # rows only ever added, all of them


def test_query_trace_and_runs_read_the_remote_run(remote_run, capsys):
    url, _, _ = remote_run
    run_id = url.rsplit("/", 1)[1]
    assert cli.main(["query", "--runs-dir", RUNS, "--format", "json",
                     "SELECT run_id, count(*) AS n, count(DISTINCT step) AS steps FROM samples GROUP BY 1"]) == 0
    assert json.loads(capsys.readouterr().out) == {"run_id": run_id, "n": 128, "steps": 16}
    assert cli.main(["query", "--runs-dir", RUNS, "--format", "json",
                     "SELECT example_id, list(step ORDER BY step) AS steps FROM samples GROUP BY 1 ORDER BY 1 LIMIT 1"
                     ]) == 0
    first = json.loads(capsys.readouterr().out)
    assert cli.main(["trace", "--runs-dir", url, "--example-id", first["example_id"], "--format", "json"]) == 0
    traced = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["step"] for row in traced] == first["steps"] and {row["run_id"] for row in traced} == {run_id}
    assert cli.main(["runs", "--runs-dir", RUNS, "--format", "json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert (listed["run_id"], listed["steps"], listed["checkpoints"], listed["status"]) == (run_id, 16, 12, "completed")


def test_eval_scores_a_remote_run_and_its_parts_land_there(s3, remote_run, capsys):
    url, _, _ = remote_run
    assert cli.main(["eval", url, "--checkpoints", "last", "--limit", "8"]) == 0
    assert "best: checkpoints/checkpoint-step-016.ckpt (step 16)" in capsys.readouterr().out
    prefix = url.removeprefix(f"s3://{BUCKET}/") + "/tracking/evals/"
    assert len(_keys(s3, prefix)) == 1
    assert cli.main(["query", "--runs-dir", url, "--format", "json",
                     "SELECT count(*) AS n, any_value(checkpoint_step) AS step FROM evals"]) == 0
    assert json.loads(capsys.readouterr().out) == {"n": 8, "step": 16}


@pytest.mark.parametrize("sql", [
    f"COPY (SELECT 1 AS x) TO '{RUNS}/injected.parquet'",
    f"SELECT * FROM read_parquet('s3://{BUCKET}/outside/secret.parquet')",
    f"SELECT * FROM read_text('s3://{BUCKET}/outside/secret.parquet')",
])
def test_the_read_only_sandbox_holds_on_the_bucket(s3, remote_run, capsys, sql):
    s3.put_object(Bucket=BUCKET, Key="outside/secret.parquet", Body=b"PAR1 not yours")
    before = _keys(s3, "")
    assert cli.main(["query", "--runs-dir", RUNS, sql]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("loratrace: error: ")
    assert _keys(s3, "") == before


def test_a_missing_bucket_is_one_line_before_training(s3, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--runs-dir", "s3://no-such-bucket/runs", "training.max_steps=2",
                     "training.stage1_steps=1"]) == 1
    err = capsys.readouterr().err
    assert err == ("loratrace: error: s3://no-such-bucket/runs: no bucket 'no-such-bucket' at this endpoint "
                   "(create it, or check AWS_ENDPOINT_URL)\n")
    assert list(tmp_path.iterdir()) == [] and "no-such-bucket" not in str(s3.list_buckets())


@pytest.mark.parametrize("command", [
    ["train", "--runs-dir", RUNS, "training.max_steps=2", "training.stage1_steps=1"],
    ["query", "--runs-dir", RUNS, "SELECT 1"],
    ["trace", "--runs-dir", RUNS, "--example-id", "x"],
    ["runs", "--runs-dir", RUNS],
    ["eval", f"{RUNS}/some_run"],
])
def test_without_credentials_one_line_and_no_local_s3_folder(tmp_path, monkeypatch, capsys, command):
    pytest.importorskip("s3fs")
    monkeypatch.chdir(tmp_path)
    for key, value in NO_CREDENTIALS.items():
        monkeypatch.setenv(key, value) if value is not None else monkeypatch.delenv(key, raising=False)
    assert cli.main(command) == 1
    err = capsys.readouterr().err
    assert err.startswith("loratrace: error: ") and "no S3 credentials" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # never a local `s3:` folder


def _first_put(key: str):
    """When moto's server (in this process) stored `key`, to the microsecond (S3 listings give whole seconds)."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    return s3_backends[DEFAULT_ACCOUNT_ID]["global"].buckets[BUCKET].keys[key].last_modified


@pytest.mark.slow
def test_under_torchrun_every_rank_publishes_its_rows_before_the_checkpoint(s3, tmp_path):
    """torchrun, two processes, runs_dir on s3: rank 1's rows of a step are on S3 before that step's checkpoint (each
    rank PUTs its own parts, and none is PUT again at the end), one run folder, no scratch folder left behind."""
    import io

    import pyarrow.parquet as pq
    from test_launchers import SETTINGS, TRAIN, finish, start, torchrun

    runs, scratch = f"s3://{BUCKET}/torchrun/runs", tmp_path / "tmp"
    scratch.mkdir()
    aws = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    process = start(torchrun(["--standalone", "--nproc_per_node", "2"], [
        *TRAIN, f"--runs-dir={runs}", *SETTINGS, "training.devices=2", "training.max_steps=5",
        "training.stage1_steps=2", "tracking.flush_every_steps=100", "export.merged_model=false"]),
        tmp_path, tmp_path / "torchrun.log", TMPDIR=str(scratch), **aws)
    ((code, err),) = finish([process])
    assert code == 0, err
    keys = _keys(s3, "torchrun/runs/")
    assert len({k.split("/")[2] for k in keys}) == 1  # one run folder
    checkpoints = sorted(k for k in keys if k.endswith(".ckpt"))
    rank1 = sorted(k for k in keys if "/tracking/batches/a000-r01-" in k)
    assert [k.rsplit("-", 1)[1] for k in checkpoints] == ["003.ckpt", "004.ckpt", "005.ckpt"]
    assert len(rank1) == 3  # a part at each checkpoint (flush_every_steps is larger than the run)
    for checkpoint, part in zip(checkpoints, rank1):
        rows = pq.read_table(io.BytesIO(s3.get_object(Bucket=BUCKET, Key=part)["Body"].read()))
        assert max(rows["step"].to_pylist()) == int(checkpoint[-8:-5]) and set(rows["rank"].to_pylist()) == {1}
        assert _first_put(part) < _first_put(checkpoint), (part, checkpoint)
    assert list(scratch.glob("loratrace-stage-*")) == []


def test_a_rank_started_by_lightning_finds_the_staged_run_it_inherits(remote_run, tmp_path, monkeypatch):
    """Lightning's launcher re-runs `train --resume-from-checkpoint s3://...` for ranks 1..N-1: each finds the copy
    its parent staged (in the environment it inherits) instead of downloading the run again, and leaves it in place."""
    from loratrace.recipe import stage_remote_checkpoint
    from loratrace.runs import storage

    url, _, _ = remote_run
    inherited = tmp_path / "parent-scratch" / url.rsplit("/", 1)[1]
    (inherited / "checkpoints").mkdir(parents=True)
    monkeypatch.setenv(storage.STAGED_ENV, f"{inherited}\n{url}")
    with storage.staging():
        assert stage_remote_checkpoint(f"{url}/checkpoints/checkpoint-step-014.ckpt") == \
            inherited / "checkpoints" / "checkpoint-step-014.ckpt"
    assert inherited.is_dir() and list(inherited.rglob("*.ckpt")) == []  # nothing downloaded, nothing removed


@pytest.mark.parametrize(("command", "named"), [
    (["export", f"{RUNS}/some_run", "--adapters", "out"],
     f"{RUNS}/some_run: export reads a run folder on this machine"),
    (["export", "some_run", "--adapters", f"s3://{BUCKET}/adapters"],
     f"s3://{BUCKET}/adapters: export writes adapters to a folder on this machine"),
    (["influence", f"{RUNS}/some_run"], f"{RUNS}/some_run: influence reads and writes a run folder on this machine"),
    (["import-legacy", "experiments", "--runs-dir", RUNS], f"{RUNS}: import-legacy writes to a folder on this machine"),
])
def test_commands_that_work_on_local_folders_refuse_a_url_in_one_line(tmp_path, monkeypatch, capsys, command, named):
    """export, influence and import-legacy: a run or output on object storage is one line naming the URL as given
    (never `s3:/bucket`), exit 1, and nothing written (never a local `s3:` folder)."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(command) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"loratrace: error: {named}") and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_influence_reads_a_file_url_as_the_folder_it_names(tmp_path, capsys):
    """No run there: the one line names the folder, not a mangled `file:/...`."""
    assert cli.main(["influence", f"file://{tmp_path}/no_run"]) == 2
    assert capsys.readouterr().err == f"loratrace: error: {tmp_path}/no_run is not a run folder (no config.yaml)\n"


def test_refusing_a_weights_only_remote_checkpoint_names_the_full_one_by_its_url(s3, remote_run, capsys):
    """Step 13 rewritten as `checkpoint.tail=weights` writes it: the refusal names step 12 on S3, not the scratch copy
    (gone when the command ends); the run on S3 is as it was."""
    import io

    import torch

    url, _, _ = remote_run
    key = url.removeprefix(f"s3://{BUCKET}/") + "/checkpoints/checkpoint-step-013.ckpt"
    full = torch.load(io.BytesIO(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()), weights_only=True)
    weights_only = io.BytesIO()
    torch.save({"state_dict": full["state_dict"], "global_step": 13,
                "loratrace": {"weights_only": True, "step": 13}}, weights_only)
    s3.put_object(Bucket=BUCKET, Key=key, Body=weights_only.getvalue())
    before = {k: s3.head_object(Bucket=BUCKET, Key=k)["ETag"] for k in _keys(s3, url.removeprefix(f"s3://{BUCKET}/"))}
    assert cli.main(["train", "--resume-from-checkpoint", f"{url}/checkpoints/checkpoint-step-013.ckpt"]) == 2
    assert capsys.readouterr().err == (
        "loratrace: error: checkpoint-step-013.ckpt holds the LoRA weights only (checkpoint.tail=weights) and cannot "
        f"resume a run; resume from {url}/checkpoints/checkpoint-step-012.ckpt\n")
    assert {k: s3.head_object(Bucket=BUCKET, Key=k)["ETag"] for k in before} == before


def test_a_stopped_remote_run_names_its_checkpoint_by_its_url(s3):
    """SIGTERM during update 4 of a run on S3: the message names the stop's checkpoint there, which a resume reads."""
    import signal

    from lightning.pytorch.callbacks import Callback

    import loratrace
    from loratrace.training.interrupt import RunInterrupted

    class Preempt(Callback):
        def on_train_batch_start(self, trainer, *args) -> None:
            if trainer.global_step == 3:
                signal.raise_signal(signal.SIGTERM)

    runs = f"s3://{BUCKET}/stopped/runs"
    with pytest.raises(RunInterrupted) as stopped:
        loratrace.train(small_config(runs, "training.max_steps=40", "tracking.enabled=false",
                                     "logging.tensorboard=false"), progress=False, callbacks=[Preempt()])
    (run,) = {k.split("/")[2] for k in _keys(s3, "stopped/runs/")}
    checkpoint = f"{runs}/{run}/checkpoints/checkpoint-step-004.ckpt"
    assert str(stopped.value) == ("interrupted by SIGTERM after step 4; resume with: loratrace train "
                                  f"--resume-from-checkpoint {checkpoint}")
    assert f"stopped/runs/{run}/checkpoints/checkpoint-step-004.ckpt" in _keys(s3, "stopped/runs/")


def test_a_resume_from_a_remote_checkpoint_continues_the_remote_run(s3, remote_run, capsys):
    """Last in this file: it adds a launch to the shared run."""
    url, _, _ = remote_run
    checkpoint = f"{url}/checkpoints/checkpoint-step-014.ckpt"
    assert cli.main(["train", "--resume-from-checkpoint", checkpoint]) == 0
    assert f"run          {url}\n" in capsys.readouterr().out
    assert cli.main(["query", "--runs-dir", url, "--format", "json", "SELECT attempt, resumed_from, resumed_step, "
                     "(SELECT count(*) FROM samples) AS samples FROM attempts ORDER BY attempt"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["attempt"], r["resumed_from"], r["resumed_step"]) for r in rows] == [(0, None, 0), (1, checkpoint, 14)]
    assert rows[0]["samples"] == 128  # the effective lineage: steps 15 and 16 once, from the resumed launch
    key = url.removeprefix(f"s3://{BUCKET}/") + "/run.json"
    info = json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    assert [a["resumed_from"] for a in info["attempts"]] == [None, checkpoint] and info["status"] == "completed"


def test_an_unreachable_endpoint_is_named_not_taken_for_a_missing_bucket(tmp_path, monkeypatch, capsys):
    pytest.importorskip("s3fs")
    monkeypatch.chdir(tmp_path)
    port = _free_port()  # nothing listens there
    for key, value in {**NO_CREDENTIALS, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
        monkeypatch.setenv(key, value) if value is not None else monkeypatch.delenv(key, raising=False)
    assert cli.main(["train", "--runs-dir", f"{RUNS}", "training.max_steps=2", "training.stage1_steps=1"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"loratrace: error: {RUNS}: cannot reach the "
                                                                 f"endpoint http://127.0.0.1:{port} "), err
    assert "no bucket" not in err and list(tmp_path.iterdir()) == []


def _scratch_owner(tmp_path: Path, then: str) -> tuple[subprocess.Popen, Path]:
    """A process that makes a scratch folder (as a staged run does), under tmp_path, then runs `then`."""
    code = ("import sys, time; from loratrace.runs import storage; "
            "print(storage._scratch_folder('run').parent, flush=True); " + then)
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "TMPDIR": str(tmp_path)})
    return process, Path(process.stdout.readline().strip())


def test_the_next_command_removes_a_killed_commands_scratch_folder_never_one_in_use(s3, tmp_path, monkeypatch,
                                                                                 capsys):
    """A SIGKILLed `train` to s3:// leaves its scratch folder: the next command removes it (its owner's pid is dead
    on this host), and leaves the folder of a process still running and one with no owner record."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    train = subprocess.Popen([sys.executable, "-m", "loratrace", "train", "--runs-dir", f"{RUNS}/killed",
                              *small_config_overrides()], cwd=work,
                             env={**os.environ, "TMPDIR": str(tmp_path)}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob("loratrace-stage-*/*/run.json")) and time.monotonic() < deadline:
        time.sleep(0.1)
    train.kill()
    train.wait()
    (killed,) = tmp_path.glob("loratrace-stage-*")
    running, in_use = _scratch_owner(tmp_path, "time.sleep(600)")
    legacy = tmp_path / "loratrace-stage-older"  # made by a version that recorded no owner
    (legacy / "run").mkdir(parents=True)
    try:
        assert cli.main(["train", "--runs-dir", "s3://no-such-bucket/runs", "training.max_steps=2",
                         "training.stage1_steps=1"]) == 1
        assert "no bucket" in capsys.readouterr().err
        assert not killed.exists() and in_use.is_dir() and legacy.is_dir()
    finally:
        running.kill()
        running.wait()


def small_config_overrides() -> list[str]:
    from conftest import SMALL

    return [*SMALL, "training.max_steps=400"]  # long enough to be killed while it trains
