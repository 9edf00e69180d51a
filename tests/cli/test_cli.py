import json
import re

import pytest
from conftest import ROOT, run_cli

from loratrace.cli.app import COMMANDS, _parser


def test_every_command_has_help_and_appears_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    sub = next(a for a in _parser()._actions if a.dest == "command")
    for name in COMMANDS:
        assert sub.choices[name].description, name
        assert f"loratrace {name}" in readme, name


def test_help_exits_zero():
    result = run_cli("trace", "--help")
    assert result.returncode == 0 and "--example-id" in result.stdout


def test_query_formats_params_and_stdin(small_run, tmp_path):
    runs = str(small_run.parent)
    table = run_cli("query", "SELECT step, loss FROM batches WHERE step <= ? ORDER BY step", "-p", "3",
                    "--runs-dir", runs)
    assert table.returncode == 0 and re.search(r"^\s*step\s+loss", table.stdout, re.MULTILINE)
    assert len(table.stdout.strip().splitlines()) == 4
    csv = run_cli("query", "-", "--format", "csv", "--runs-dir", runs, stdin="SELECT count(*) AS n FROM samples")
    assert csv.stdout.splitlines() == ["n", str(16 * 8)]
    js = run_cli("query", "SELECT step FROM batches ORDER BY step LIMIT 2", "--format", "json", "--runs-dir", runs)
    assert [json.loads(line)["step"] for line in js.stdout.splitlines()] == [1, 2]
    out = tmp_path / "steps.parquet"
    pq = run_cli("query", "SELECT * FROM step_checkpoint", "--format", "parquet", "--output", str(out),
                 "--runs-dir", runs)
    assert pq.returncode == 0
    import pandas as pd

    assert len(pd.read_parquet(out)) == 16


@pytest.mark.parametrize("sql, message", [
    ("SELEC 1", "SQL error"),
    ("COPY (SELECT 1) TO '/tmp/x.csv'", "COPY statements are not allowed"),
])
def test_query_errors_are_one_line_exit_1(small_run, sql, message):
    result = run_cli("query", sql, "--runs-dir", str(small_run.parent))
    assert result.returncode == 1
    assert result.stderr.strip().startswith("loratrace: error:") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_trace_and_runs(small_run):
    runs = str(small_run.parent)
    example = run_cli("query", "SELECT example_id FROM samples ORDER BY step, position LIMIT 1", "--format", "csv",
                      "--runs-dir", runs).stdout.splitlines()[1]
    result = run_cli("trace", "--example-id", example, "--runs-dir", runs)
    assert result.returncode == 0 and f"{small_run.name}: {example}" in result.stdout
    assert "first included in checkpoint-step 9" in result.stdout
    line = run_cli("query", "SELECT line FROM samples WHERE example_id = ? LIMIT 1", "-p", example, "--format", "csv",
                   "--runs-dir", runs).stdout.splitlines()[1]
    by_line = run_cli("trace", "--line", line, "--run", small_run.name, "--runs-dir", runs)
    assert by_line.returncode == 0 and f"{example} (line {line})" in by_line.stdout
    missing = run_cli("trace", "--example-id", "LTSYN_TRA_99999", "--runs-dir", runs)
    assert missing.returncode == 1 and "closest: LTSYN_TRA_" in missing.stderr
    listing = run_cli("runs", "--runs-dir", runs)
    assert small_run.name in listing.stdout and "completed" in listing.stdout


@pytest.mark.parametrize("args", [["query", "SELECT 1"], ["runs"], ["trace", "--line", "0"],
                                  ["trace", "--example-id", "LTSYN_TRA_0001", "--format", "json"],
                                  ["query", "SELECT * FROM batches", "--format", "csv"],
                                  ["query", "SELECT * FROM checkpoints", "--format", "json"]])
def test_query_trace_and_runs_import_neither_torch_nor_transformers_nor_pandas(small_run, args):
    import subprocess
    import sys

    code = ("import sys; from loratrace.cli import main; main(sys.argv[2:] + ['--runs-dir', sys.argv[1]]); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'; "
            "assert 'pandas' not in sys.modules, 'pandas'")
    result = subprocess.run([sys.executable, "-c", code, str(small_run.parent), *args], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr


def test_a_config_error_of_train_comes_before_torch_is_imported(tmp_path):
    import subprocess
    import sys

    code = ("import sys; from loratrace.cli import main; "
            "assert main(['train', 'training.max_step=3', '--runs-dir', sys.argv[1]]) == 2; "
            "assert 'torch' not in sys.modules, 'torch imported before the config was checked'")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "runs")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "unknown config key training.max_step" in result.stderr and not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------- issue #11

def _one_error_line(result, code: int = 1) -> str:
    assert result.returncode == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loratrace: error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("args, message", [
    (["query", "SELECT CAST('abc' AS INTEGER)"], "SQL error: Conversion Error"),
    (["query", "SELECT step FROM batches WHERE step <= ?", "-p", "abc"], "SQL error: Conversion Error"),
    (["query", "SELECT 1", "-o", "no/such/folder/x.csv", "--format", "csv"], "folder"),
    (["query", "SELECT 1", "-o", ".", "--format", "csv"], "--output ."),
    (["trace", "--example-id", "LTSYN_TRA_0001", "--run", "nope"], "no run nope under"),
])
def test_failures_while_running_are_one_line(small_run, tmp_path, args, message):
    result = run_cli(*args, "--runs-dir", str(small_run.parent), cwd=tmp_path)
    assert message in _one_error_line(result)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_trace_and_runs_over_folders_without_tracked_runs(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _one_error_line(run_cli("runs", "--runs-dir", str(empty))) == f"loratrace: error: no runs under {empty}"
    assert "no runs under" in _one_error_line(run_cli("trace", "--line", "0", "--runs-dir", str(empty)))
    (empty / "fresh" / "tracking" / "batches").mkdir(parents=True)  # the first seconds of a tracked run
    (empty / "fresh" / "run.json").write_text('{"run_id": "fresh", "status": "running"}')
    assert "no tracked batches yet" in _one_error_line(run_cli("trace", "--example-id", "x", "--runs-dir",
                                                                str(empty)))
    listing = run_cli("runs", "--runs-dir", str(empty))
    assert listing.returncode == 0 and "fresh" in listing.stdout and "running" in listing.stdout


def test_trace_of_an_example_in_the_run_that_never_trained(small_run):
    runs = str(small_run.parent)
    untrained = run_cli("query", "SELECT example_id FROM examples WHERE example_id NOT IN (SELECT example_id FROM "
                        "samples) ORDER BY 1 LIMIT 1", "--format", "csv", "--runs-dir", runs).stdout.splitlines()[1]
    line = _one_error_line(run_cli("trace", "--example-id", untrained, "--runs-dir", runs))
    assert line == (f"loratrace: error: example id {untrained!r} is in the examples of run {small_run.name} but was "
                    "never trained (so far)")


def test_warnings_are_one_clean_line_on_stderr(small_run, tmp_path):
    import shutil

    run = tmp_path / "runs" / small_run.name
    shutil.copytree(small_run, run)
    part = sorted((run / "tracking" / "batches").iterdir())[-1]
    part.write_bytes(part.read_bytes()[:50])  # cut short by a crash
    (run / "tracking" / "batches" / "notes.parquet").write_text("not mine")
    example = pq_first_example(run)
    result = run_cli("trace", "--example-id", example, "--runs-dir", str(run.parent))
    assert result.returncode == 0, result.stderr
    assert sorted(result.stderr.splitlines()) == [
        f"loratrace: warning: ignoring {run}/tracking/batches/notes.parquet: not a file name the tracker writes",
        f"loratrace: warning: skipping unreadable tracking part {part}"]
    assert "warning" not in result.stdout.lower() and "warn(" not in result.stderr


def pq_first_example(run) -> str:
    import pyarrow.parquet as pq

    return pq.read_table(sorted((run / "tracking" / "batches").iterdir())[0])["example_ids"][0][0].as_py()


def test_query_help_lists_every_view_and_the_formats():
    from loratrace.query.views import VIEW_NAMES

    text = run_cli("query", "--help").stdout
    assert all(view in text for view in VIEW_NAMES)
    assert "JSON Lines: one JSON object per row" in text and "lists and structs are JSON text" in text


def test_an_empty_result_prints_its_header(small_run):
    result = run_cli("query", "SELECT step, loss FROM batches WHERE false", "--runs-dir", str(small_run.parent))
    assert result.returncode == 0 and result.stdout.split() == ["step", "loss"]
    csv = run_cli("query", "SELECT step, loss FROM batches WHERE false", "--format", "csv", "--runs-dir",
                  str(small_run.parent))
    assert csv.stdout.splitlines() == ["step,loss"]


# ---------------------------------------------------------------------------------------------- issue #24

def test_progress_lines_every_n_steps_under_gradient_accumulation(capsys):
    """ProgressLines in a plain Lightning loop: one line at each multiple of N and at the last update, none per
    micro-batch, no carriage return; its loss is the micro-batch's undivided loss."""
    import lightning as L
    import torch

    from loratrace.training.progress import ProgressLines, progress_mode

    class Constant(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.tensor(2.0))

        def training_step(self, batch, batch_idx):
            return {"loss": self.weight * 0 + 1.5}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.25)

    data = torch.utils.data.DataLoader(torch.zeros(64, 1), batch_size=2)
    trainer = L.Trainer(max_steps=7, accumulate_grad_batches=2, callbacks=[ProgressLines(3)], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu")
    capsys.readouterr()
    trainer.fit(Constant(), data)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("step ")]
    assert [line.split()[:2] for line in lines] == [["step", "3/7"], ["step", "6/7"], ["step", "7/7"]]
    assert all("  loss 1.5000  lr 0.25  " in line for line in lines) and "\r" not in err
    assert "left" in lines[0] and "left" not in lines[-1]
    assert progress_mode("auto") == "lines"  # pytest's stderr is no terminal
    assert (progress_mode("bar"), progress_mode("lines", enabled=False)) == ("bar", "none")


@pytest.mark.parametrize("args, message", [
    (["config", "--format", "json"], "--format goes with --keys"),
    (["train", "--print-config", "--resume-from-checkpoint", "x.ckpt"], "a resumed run's is its config.yaml"),
    (["train", "--print-config", "logging.progress=sometimes"], "logging.progress: 'sometimes' is not one of auto"),
])
def test_config_and_print_config_mistakes_are_one_line_exit_2(tmp_path, args, message):
    result = run_cli(*args, cwd=tmp_path)
    assert message in _one_error_line(result, 2) and result.stdout == ""
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- issue #24: runs


@pytest.fixture(scope="module")
def named_runs(small_run, tmp_path_factory):
    """A runs folder: a copy of small_run (no name, no tag, no evals) and a 3-step run named `lr-high`, tagged `lr`
    and `demo`, another stage-1 learning rate, each checkpoint scored on 8 examples."""
    import shutil

    from conftest import small_config

    import loratrace

    runs = tmp_path_factory.mktemp("named-runs")
    shutil.copytree(small_run, runs / small_run.name, ignore=shutil.ignore_patterns("final_model", "base_model"))
    named = loratrace.train(small_config(runs, "training.max_steps=3", "training.stage1_steps=2",
                                         "training.learning_rate_stage1=0.002", "eval.every_checkpoint=true",
                                         "eval.limit=8", "export.merged_model=false", "run.name=lr-high",
                                         "run.tags=[lr, demo]"), progress=False)
    return runs, small_run.name, named


def test_runs_shows_names_tags_metrics_and_the_differing_hyperparameters(named_runs):
    import loratrace

    runs, plain, named = named_runs
    info = json.loads((named / "run.json").read_text())
    assert (info["name"], info["tags"]) == ("lr-high", ["lr", "demo"])
    rows = [json.loads(line) for line in run_cli("runs", "--runs-dir", str(runs), "--format", "json")
            .stdout.splitlines()]
    by_id = {row["run_id"]: row for row in rows}
    assert list(by_id) == [plain, named.name]  # oldest first
    mine = by_id[named.name]
    assert (mine["name"], mine["tags"], mine["status"], mine["steps"]) == ("lr-high", ["lr", "demo"], "completed", 3)
    assert mine["duration_s"] > 0 and mine["best_eval_step"] == 3 and mine["best_eval_split"] == "validation"
    with loratrace.open_runs(named) as db:
        (final_loss,), = db.sql("SELECT value FROM metrics WHERE name = 'train/loss' AND step = 3").fetchall()
        best, = db.sql("SELECT accuracy, stderr FROM eval_accuracy ORDER BY accuracy DESC, checkpoint_step LIMIT 1") \
            .fetchall()
    assert mine["final_loss"] == pytest.approx(final_loss)
    assert (mine["best_eval_accuracy"], mine["best_eval_stderr"]) == pytest.approx(best)
    assert (by_id[plain]["name"], by_id[plain]["tags"], by_id[plain]["best_eval_accuracy"]) == (None, [], None)
    # the hyperparameters that differ, as typed in config.yaml; the labels (run.*) and the same values are left out
    differing = {key for key in mine if "." in key}
    assert {"training.max_steps", "training.stage1_steps", "training.learning_rate_stage1"} <= differing
    assert not any(key.startswith(("run.", "lora.", "data.")) for key in differing)
    assert (mine["training.max_steps"], by_id[plain]["training.max_steps"]) == (3, 16)
    table = run_cli("runs", "--runs-dir", str(runs))
    header, *lines = table.stdout.splitlines()
    assert header.split()[:8] == ["run_id", "name", "tags", "status", "duration", "steps", "final_loss", "best_eval"]
    assert "training.learning_rate_stage1" in header and len(lines) == 2
    assert "lr-high" in lines[1] and "lr,demo" in lines[1] and "completed" in lines[1]
    assert f"{best[0]:.3f} +/- {best[1]:.3f} (step 3)" in lines[1]


def test_runs_tag_filters(named_runs):
    runs, plain, named = named_runs
    tagged = run_cli("runs", "--runs-dir", str(runs), "--tag", "demo", "--format", "csv")
    assert tagged.returncode == 0 and [line.split(",")[0] for line in tagged.stdout.splitlines()] == [
        "run_id", named.name]
    both = run_cli("runs", "--runs-dir", str(runs), "--tag", "demo", "--tag", "lr")
    assert named.name in both.stdout and plain not in both.stdout
    # one run listed: nothing differs, so no hyperparameter column
    assert not any("." in column for column in both.stdout.splitlines()[0].split())
    assert _one_error_line(run_cli("runs", "--runs-dir", str(runs), "--tag", "demo", "--tag", "nope")) == \
        f"loratrace: error: no run under {runs} is tagged demo and nope"
