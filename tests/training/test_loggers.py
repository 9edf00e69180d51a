"""Every logger at once (issue #14): each one's files, read back with its own reader, hold the loss of `batches` at
every step and the accuracy of `evals` at every checkpoint; a logger that cannot start is one line before training."""

import csv
import json
import struct
from pathlib import Path

import pytest
from conftest import run_cli, small_config

import loratrace

pytest.importorskip("mlflow")
pytest.importorskip("wandb")

ALL = ["logging.mlflow=true", "logging.wandb=true", "logging.csv=true", "logging.tensorboard=true",
       "eval.every_checkpoint=true", "eval.limit=12", "training.max_steps=8", "training.stage1_steps=6"]


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory) -> Path:
    return loratrace.train(small_config(tmp_path_factory.mktemp("logged-runs"), *ALL), progress=False)


@pytest.fixture(scope="module")
def expected(logged_run):
    """What every logger must hold: loss per step from `batches`, accuracy per checkpoint from `evals`."""
    with loratrace.open_runs(logged_run) as db:
        loss = dict(db.sql("SELECT step, value FROM metrics WHERE name = 'train/loss' ORDER BY step").fetchall())
        accuracy = dict(db.sql("SELECT checkpoint_step, avg(correct::INT) FROM evals GROUP BY 1").fetchall())
    assert sorted(loss) == list(range(1, 9)) and sorted(accuracy) == [7, 8]
    return loss, accuracy


def _same(logged: dict, wanted: dict) -> None:
    assert sorted(logged) == sorted(wanted)
    for step, value in wanted.items():
        assert logged[step] == pytest.approx(value, rel=1e-5), step


def test_mlflow_client_reads_params_metrics_and_artifacts(logged_run, expected):
    from mlflow import MlflowClient

    from loratrace.config import load_config
    from loratrace.training.loggers import find_mlflow_run, mlflow_tracking_uri

    cfg = load_config(logged_run / "config.yaml")
    assert mlflow_tracking_uri(cfg).startswith("sqlite:///") and (logged_run.parent / "mlflow.db").is_file()
    client = MlflowClient(tracking_uri=mlflow_tracking_uri(cfg))
    run_id = find_mlflow_run(cfg, logged_run.name)
    run = client.get_run(run_id)
    assert run.data.params["training.seed"] == str(cfg.training.seed)
    assert run.data.params["training.max_steps"] == "8"
    _same({m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}, expected[0])
    _same({m.step: m.value for m in client.get_metric_history(run_id, "eval/validation_accuracy")}, expected[1])
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "final_adapter"} <= artifacts
    assert any(a.path.endswith("adapter_model.safetensors") for a in client.list_artifacts(run_id, "final_adapter"))
    local = Path(client.download_artifacts(run_id, "config.yaml", dst_path=str(logged_run.parent / "dl")))
    assert local.read_text() == (logged_run / "config.yaml").read_text()


def wandb_records(path: Path):
    """The records of a W&B offline run file: its LevelDB-style log framing (7-byte file header, 32 KiB blocks of
    chunks with a 7-byte header: crc, length, type), each record a `wandb_internal_pb2.Record` (W&B's own schema)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, pending = 7, b""
    while position + 7 <= len(data):
        room = 32768 - position % 32768
        if room < 7:
            position += room
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        chunk = data[position + 7: position + 7 + length]
        position += 7 + length
        if kind == 0 and length == 0:
            continue
        pending += chunk
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_run_file_holds_the_same_numbers(logged_run, expected):
    files = list((logged_run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    logged: dict[str, dict[int, float]] = {}
    config = None
    for record in wandb_records(files[0]):
        if record.HasField("history"):
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                     for item in record.history.item}
            for key, value in items.items():
                if "trainer/global_step" in items and not key.startswith(("_", "trainer/")):
                    logged.setdefault(key, {})[int(items["trainer/global_step"])] = value
        for updates in ([record.config] if record.HasField("config") else []) + \
                ([record.run.config] if record.HasField("run") else []):
            config = {**(config or {}), **{item.key: json.loads(item.value_json) for item in updates.update}}
    _same(logged["train/loss"], expected[0])
    _same(logged["eval/validation_accuracy"], expected[1])
    assert config and config["training"]["max_steps"] == 8


def test_csv_logger_layout_holds_the_same_numbers(logged_run, expected):
    with open(logged_run / "csv_logs" / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    _same({int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}, expected[0])
    _same({int(r["step"]): float(r["eval/validation_accuracy"]) for r in rows if r.get("eval/validation_accuracy")},
          expected[1])


def test_tensorboard_holds_the_same_numbers(logged_run, expected):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logged_run / "tensorboard_logs"))
    events.Reload()
    _same({e.step: e.value for e in events.Scalars("train/loss")}, expected[0])
    _same({e.step: e.value for e in events.Scalars("eval/validation_accuracy")}, expected[1])


def test_eval_afterwards_reaches_csv_and_mlflow(logged_run):
    from mlflow import MlflowClient

    from loratrace.config import load_config
    from loratrace.training.loggers import find_mlflow_run, mlflow_tracking_uri

    result = run_cli("eval", str(logged_run), "--checkpoints", "last", "--split", "test", "--limit", "8")
    assert result.returncode == 0, result.stderr
    with loratrace.open_runs(logged_run) as db:
        accuracy = db.sql("SELECT avg(correct::INT) FROM evals WHERE split = 'test'").fetchall()[0][0]
    with open(logged_run / "csv_logs" / "metrics.csv", newline="") as file:
        rows = [r for r in csv.DictReader(file) if r.get("eval/test_accuracy")]
    assert [(int(r["step"]), float(r["eval/test_accuracy"])) for r in rows] == [(8, pytest.approx(accuracy))]
    cfg = load_config(logged_run / "config.yaml")
    client = MlflowClient(tracking_uri=mlflow_tracking_uri(cfg))
    history = client.get_metric_history(find_mlflow_run(cfg, logged_run.name), "eval/test_accuracy")
    assert [(m.step, m.value) for m in history] == [(8, pytest.approx(accuracy))]
    tables = [a.path for a in client.list_artifacts(find_mlflow_run(cfg, logged_run.name), "evals/test")]
    assert len(tables) == 1 and tables[0].startswith("evals/test/s000000008-")  # its per-example table too


@pytest.mark.parametrize("prelude, overrides, message", [
    ("", ["logging.mlflow=true", "logging.mlflow_tracking_uri=bogus://nowhere"],
     "logging.mlflow_tracking_uri='bogus://nowhere': MLflow cannot"),
    ("sys.modules['wandb'] = None; ", ["logging.wandb=true"], "logging.wandb=true needs the wandb package"),
    ("", ["logging.wandb=true", "logging.wandb_mode=online"], "logging.wandb_mode=online needs a W&B login"),
])
def test_a_logger_that_cannot_start_is_one_line_before_training(tmp_path, prelude, overrides, message):
    import os
    import subprocess
    import sys

    runs = tmp_path / "runs"
    code = f"import sys; {prelude}from loratrace.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")} | {"HOME": str(tmp_path)}  # no login
    result = subprocess.run([sys.executable, "-c", code, "train", *overrides, f"runs_dir={runs}",
                             "training.max_steps=2", "training.stage1_steps=1"], capture_output=True, text=True,
                            timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loratrace: error: ") and message in lines[0], result.stderr
    assert not runs.exists()  # no run folder, no store


def test_a_resume_keeps_each_step_once_in_the_csv_and_continues_the_mlflow_run(tmp_path):
    from mlflow import MlflowClient

    from loratrace.training.loggers import mlflow_tracking_uri

    cfg = small_config(tmp_path, "logging.csv=true", "logging.mlflow=true", "training.max_steps=6",
                       "training.stage1_steps=3", "export.merged_model=false")
    run_dir = loratrace.train(cfg, progress=False)
    metrics = run_dir / "csv_logs" / "metrics.csv"
    with open(metrics, newline="") as file:
        before = {int(r["step"]): r["train/loss"] for r in csv.DictReader(file) if r.get("train/loss")}
    loratrace.train(cfg, resume_from=run_dir / "checkpoints" / "checkpoint-step-004.ckpt", progress=False)
    with open(metrics, newline="") as file:
        steps = [int(r["step"]) for r in csv.DictReader(file) if r.get("train/loss")]
    assert steps == [1, 2, 3, 4, 5, 6]  # steps 5 and 6 of the first launch dropped, logged again by the resume
    with open(metrics, newline="") as file:
        after = {int(r["step"]): r["train/loss"] for r in csv.DictReader(file) if r.get("train/loss")}
    assert {s: after[s] for s in range(1, 5)} == {s: before[s] for s in range(1, 5)}
    client = MlflowClient(tracking_uri=mlflow_tracking_uri(cfg))
    experiment = client.get_experiment_by_name(cfg.logging.project)
    found = client.search_runs([experiment.experiment_id], filter_string=f"tags.`loratrace.run_id` = '{run_dir.name}'")
    assert len(found) == 1
    with loratrace.open_runs(run_dir) as db:
        loss = dict(db.sql("SELECT step, value FROM metrics WHERE name = 'train/loss'").fetchall())
    history = client.get_metric_history(found[0].info.run_id, "train/loss")
    latest = {m.step: m.value for m in sorted(history, key=lambda m: m.timestamp)}
    _same(latest, loss)


def test_tensorboard_hparams_tab_holds_the_config_and_final_metrics(logged_run, expected):
    """Read with TensorBoard's own reader and its hparams plugin's schema: what the HParams tab shows."""
    import yaml
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(logged_run / "tensorboard_logs"))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["training.max_steps"].number_value == 8
    assert start.hparams["training.stage1_steps"].number_value == 6
    assert start.hparams["data.dataset"].string_value == "arc-challenge"
    assert start.hparams["logging.mlflow"].number_value == 1  # torch writes a bool as a number
    metrics = {info.name.tag for info in experiment.metric_infos}
    assert metrics == {"hparams/train_loss", "hparams/train_accuracy", "hparams/eval_validation_accuracy"}
    final = {tag: events.Scalars(tag) for tag in metrics}
    assert [(e.step, e.value) for e in final["hparams/train_loss"]] == [(8, pytest.approx(expected[0][8], rel=1e-5))]
    with loratrace.open_runs(logged_run) as db:  # the training's own evaluation (`eval` may add a test split later)
        accuracy = db.sql("SELECT avg(correct::INT) FROM evals WHERE split = 'validation' AND checkpoint_step = 8"
                          ).fetchall()[0][0]
    assert final["hparams/eval_validation_accuracy"][0].value == pytest.approx(accuracy)
    saved = yaml.safe_load((logged_run / "tensorboard_logs" / "hparams.yaml").read_text())
    assert saved["training.max_steps"] == 8 and saved["lora.r"] == 16  # it was {}


def test_mlflow_holds_each_evaluation_as_a_per_example_table(logged_run):
    from mlflow import MlflowClient

    from loratrace.config import load_config
    from loratrace.training.loggers import find_mlflow_run, mlflow_tracking_uri

    cfg = load_config(logged_run / "config.yaml")
    client = MlflowClient(tracking_uri=mlflow_tracking_uri(cfg))
    run_id = find_mlflow_run(cfg, logged_run.name)
    tables = [a.path for a in client.list_artifacts(run_id, "evals/validation")]
    assert len(tables) == 2 and all(path.endswith(".json") for path in tables)  # checkpoints 7 and 8
    with loratrace.open_runs(logged_run) as db:
        rows = db.sql("SELECT checkpoint_step, example_id, pred, correct, p_gold FROM evals WHERE split = 'validation' "
                      "ORDER BY checkpoint_step, example_id").fetchall()
    logged = []
    for path in tables:
        local = client.download_artifacts(run_id, path, dst_path=str(logged_run.parent / "dl-evals"))
        table = json.loads(Path(local).read_text())  # MLflow's table layout: columns, data
        for values in table["data"]:
            row = dict(zip(table["columns"], values))
            logged.append((row["checkpoint_step"], row["example_id"], row["pred"], row["correct"], row["p_gold"]))
    assert len(logged) == len(rows) == 2 * 12
    for got, want in zip(sorted(logged), rows):
        assert got[:4] == want[:4] and got[4] == pytest.approx(want[4], rel=1e-6)


def test_a_resume_opens_its_tensorboard_file_in_a_later_second_than_the_earlier_ones(tmp_path):
    """TensorBoard orders event files by the second in their names, then by a counter compared as text: after an
    attempt shorter than a second, the resume waits for the next second; after an older file, not at all."""
    import time

    from loratrace.training.loggers import _after_earlier_event_files

    now = int(time.time())
    (tmp_path / f"events.out.tfevents.{now}.host.name.41.9").write_bytes(b"")
    _after_earlier_event_files(tmp_path)
    assert time.time() >= now + 1
    older = tmp_path / "old"
    older.mkdir()
    (older / f"events.out.tfevents.{now - 60}.host.41.9").write_bytes(b"")
    started = time.monotonic()
    _after_earlier_event_files(older)
    assert time.monotonic() - started < 0.5
