"""Values in the record and inputs to training (issues #21, #27): the loss a run records under gradient accumulation,
a runs folder that cannot be one, and what a SIGTERM'd run prints."""

import csv
import json
import signal
from pathlib import Path

import pytest
from conftest import ROOT, SMALL, run_cli, small_config, train_then_signal

import loratrace


@pytest.mark.parametrize("accumulate", [1, 2, 3])
def test_recorded_loss_is_the_micro_batch_loss_under_gradient_accumulation(tmp_path, accumulate):
    """Lightning divides the loss by accumulate_grad_batches before callbacks see it; `batches.loss` and a sweep's
    intermediate values were that share (loss / k). Now: each row's loss is the token-weighted mean of its examples'
    losses, and TensorBoard, the CSV, run.json's final_loss and Optuna's intermediate values hold the step's loss as
    the `batches` view gives it."""
    import optuna
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from loratrace.sweeps.reporter import TrialReporter
    from loratrace.sweeps.trials import Objective

    cfg = small_config(tmp_path, "training.batch_size=4", "training.max_steps=4", "training.stage1_steps=2",
                       f"training.accumulate_grad_batches={accumulate}", "logging.csv=true", "logging.tensorboard=true")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize")
    reporter = TrialReporter(study.ask(), Objective("final_loss", "minimize"), "study", cfg)
    run_dir = Path(loratrace.train(cfg, progress=False, callbacks=[reporter], checkpoint_listeners=[reporter]))

    with loratrace.open_runs(run_dir) as db:
        rows = db.sql("""
            SELECT b.step, b.micro_batch, any_value(b.loss) AS loss,
                   sum(s.loss * e.n_target_tokens) / sum(e.n_target_tokens) AS from_examples
            FROM batches b
            JOIN samples s USING (run_id, step, micro_batch, rank)
            JOIN examples e USING (run_id, example_id)
            GROUP BY ALL ORDER BY ALL""").fetchall()
        per_step = dict(db.sql("SELECT step, value FROM metrics WHERE name = 'train/loss' ORDER BY step").fetchall())
    assert len(rows) == 4 * accumulate
    for step, micro_batch, loss, from_examples in rows:
        assert loss == pytest.approx(from_examples, rel=1e-5), (step, micro_batch)
    assert sorted(per_step) == [1, 2, 3, 4]

    events = EventAccumulator(str(run_dir / "tensorboard_logs"))
    events.Reload()
    with open(run_dir / "csv_logs" / "metrics.csv", newline="") as file:
        logged_csv = {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(file) if r.get("train/loss")}
    final_loss = json.loads((run_dir / "run.json").read_text())["final_loss"]
    for logged in ({e.step: e.value for e in events.Scalars("train/loss")}, logged_csv,
                   study.trials[0].intermediate_values, {4: final_loss}):
        assert logged, "a logger holds no loss"
        for step, value in logged.items():
            assert value == pytest.approx(per_step[step], rel=1e-5), step
    assert sorted(study.trials[0].intermediate_values) == [3, 4]


@pytest.mark.parametrize("where", ["file", "below a file"])
def test_train_into_a_runs_dir_that_is_a_file_is_one_line_and_writes_nothing(tmp_path, where):
    """Issue #27: `train --runs-dir FILE` ended in a traceback from mkdir."""
    blocker = tmp_path / "runs"
    blocker.write_text("not a folder\n")
    runs_dir = blocker if where == "file" else blocker / "inner"
    result = run_cli("train", "--runs-dir", str(runs_dir), "training.max_steps=2", "training.stage1_steps=1",
                     "logging.mlflow=true", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == (f"loratrace: error: runs_dir {runs_dir}: {blocker} is a file, not a folder "
                             "(name a folder)\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"] and blocker.read_text() == "not a folder\n"


@pytest.mark.slow
def test_a_sigterm_stop_leaves_no_swanlab_or_lightning_line_on_stderr(tmp_path):
    """Lightning finalizes the loggers with "failed" on a SIGTERM's stop, and SwanLab's logger printed "received
    non-success Lightning finalize status" next to the one line that says how to resume."""
    args = ["--config", str(ROOT / "configs" / "tiny.yaml"), *SMALL, "logging.swanlab=true",
            "training.max_steps=2000", "training.stage1_steps=1990"]
    returncode, _, err = train_then_signal(tmp_path, args, signal.SIGTERM, timeout=300)
    assert returncode == 143, err[-2000:]
    assert "swanlab" not in err.lower(), err[-2000:]
    assert "Received SIGTERM" not in err, err[-2000:]  # Lightning's own INFO line: the stop is said once, below
    assert err.strip().splitlines()[-1].startswith("loratrace: error: interrupted by SIGTERM after step ")
    assert (next(tmp_path.iterdir()) / "swanlab_logs").is_dir()  # SwanLab did record the run
