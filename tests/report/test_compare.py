"""`loratrace compare` and `loratrace.compare` (issue #14) on real runs: a changed seed, a repeat, a changed lr."""

import csv
import io
import json
from pathlib import Path

import pytest
from conftest import run_cli, small_config

import loratrace

SHORT = ["training.max_steps=6", "training.stage1_steps=4", "eval.every_checkpoint=true", "eval.limit=20",
         "export.merged_model=false"]


@pytest.fixture(scope="module")
def four_runs(tmp_path_factory) -> dict[str, Path]:
    """reference, the same config again, another seed, another stage-1 learning rate: one runs folder."""
    runs = tmp_path_factory.mktemp("compare-runs")
    variants = {"reference": [], "repeat": [], "seed": ["training.seed=7"],
                "lr": ["training.learning_rate_stage1=0.002"]}
    return {name: loratrace.train(small_config(runs, *SHORT, *extra), progress=False)
            for name, extra in variants.items()}


def test_another_seed_diverges_at_step_1(four_runs):
    c = loratrace.compare([four_runs["reference"], four_runs["seed"]])
    assert c.config.key.tolist() == ["training.seed"]
    assert c.config[four_runs["seed"].name].tolist() == ["7"]
    order = c.data_order.iloc[0]
    assert order.run_id == four_runs["seed"].name and order.steps_compared == 6
    assert not order.same_order and order.first_divergent_step == 1
    assert set(c.metrics.name) == {"train/loss", "train/grad_norm", "train/lr", "train/accuracy"}
    loss = c.metrics[c.metrics.name == "train/loss"]
    assert loss.step.tolist() == [1, 2, 3, 4, 5, 6]
    with loratrace.open_runs(four_runs["seed"]) as db:
        losses = db.sql("SELECT step, value FROM metrics WHERE name = 'train/loss' ORDER BY step").fetchall()
    assert loss[four_runs["seed"].name].tolist() == pytest.approx([v for _, v in losses])


def test_the_same_seed_and_config_trains_the_same_order_with_no_example_differences(four_runs):
    c = loratrace.compare([four_runs["reference"], four_runs["repeat"]])
    assert c.config.empty
    order = c.data_order.iloc[0]
    assert order.same_order and order.same_examples and order.steps_compared == 6
    assert order.first_divergent_step is pd_na()
    assert c.examples.empty and c.forgetting.empty
    assert c.evals[four_runs["reference"].name].tolist() == c.evals[four_runs["repeat"].name].tolist()
    assert c.evals.checkpoint_step.tolist() == [5, 6]


def pd_na():
    import pandas as pd

    return pd.NA


def test_a_learning_rate_change_names_only_that_key(four_runs):
    c = loratrace.compare([four_runs["reference"], four_runs["lr"]])
    assert c.config.values.tolist() == [["training.learning_rate_stage1", "0.001", "0.002"]]
    assert c.data_order.iloc[0].same_order  # the order depends on the seed, not the learning rate


def test_example_level_differences_match_the_evals_view(four_runs):
    reference, other = four_runs["reference"], four_runs["lr"]
    c = loratrace.compare([reference, other])
    with loratrace.open_runs([reference, other]) as db:
        rows = db.sql("""SELECT run_id, example_id, correct FROM evals WHERE checkpoint_step = 6""").fetchall()
    correct = {(r, e): ok for r, e, ok in rows}
    flipped = sorted(e for (r, e), ok in correct.items() if r == reference.name and correct[(other.name, e)] != ok)
    assert sorted(c.examples.example_id) == flipped
    for row in c.examples.itertuples():
        assert row.reference_correct == correct[(reference.name, row.example_id)] != row.run_correct


def test_cli_table_csv_json_and_errors(four_runs, tmp_path):
    a, b = str(four_runs["reference"]), str(four_runs["seed"])
    table = run_cli("compare", a, b)
    assert table.returncode == 0, table.stderr
    assert "== data_order ==" in table.stdout and "training.seed" in table.stdout
    as_csv = run_cli("compare", a, b, "--format", "csv", "--section", "data_order")
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [(r["same_order"], r["first_divergent_step"]) for r in rows] == [("false", "1")]
    out = tmp_path / "c.jsonl"
    as_json = run_cli("compare", a, b, "--format", "json", "--steps", "--output", str(out))
    assert as_json.returncode == 0 and as_json.stdout == ""
    records = [json.loads(line) for line in out.read_text().splitlines()]
    config = [r for r in records if r["section"] == "config"]
    assert config == [{"section": "config", "key": "training.seed", Path(a).name: "42", Path(b).name: "7"}]
    losses = {r["step"]: r[Path(b).name] for r in records if r["section"] == "metrics" and r["name"] == "train/loss"}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    one = run_cli("compare", a)
    assert one.returncode == 1 and one.stderr.startswith("loratrace: error: compare needs at least two runs")
    bad = run_cli("compare", a, b, "--format", "csv")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--section" in bad.stderr



# ---------------------------------------------------------------------------------------------- issue #24: the summary

def test_the_default_is_a_summary_with_stderr_and_no_per_step_rows(four_runs):
    reference, other = four_runs["reference"], four_runs["lr"]
    result = run_cli("compare", str(reference), str(other))
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for section in ("== runs ==", "== config ==", "== evals: validation, label scoring (accuracy +/- stderr) ==",
                    "== data_order ==", "== examples =="):
        assert section in text
    assert "train/grad_norm" not in text and "== metrics ==" not in text and "== forgetting ==" not in text
    assert f"{other.name}: the same examples in the same order as the reference at all 6 steps compared" in text
    assert "training.learning_rate_stage1" in text and "run.name" not in text
    c = loratrace.compare([reference, other])
    with loratrace.open_runs([reference, other]) as db:
        scores = db.sql("SELECT run_id, checkpoint_step, accuracy, stderr FROM eval_accuracy").fetchall()
    for run_id, step, accuracy, error in scores:  # every evaluation with its stderr, in the table and the text
        row = c.evals[c.evals.checkpoint_step == step].iloc[0]
        assert (row[run_id], row[f"{run_id} stderr"]) == pytest.approx((accuracy, error))
        assert error == pytest.approx((accuracy * (1 - accuracy) / 19) ** 0.5)
        assert f"{accuracy:.3f} +/- {error:.3f}" in text
    flips = len(c.examples)
    assert (f"{other.name}: {(c.examples.run_correct).sum()} examples right only here, "
            f"{(c.examples.reference_correct).sum()} right only in the reference" in text) == (flips > 0)
    assert f"best: {other.name} " in text and ("within the noise" in text or "by more than 1.96" in text)
    last_loss = c.metrics[c.metrics.name == "train/loss"].set_index("step")[reference.name][6]
    assert c.runs.set_index("run_id").final_loss[reference.name] == pytest.approx(last_loss)
    with_steps = run_cli("compare", str(reference), str(other), "--steps").stdout
    assert with_steps.startswith(text) and "== metrics ==" in with_steps and "train/grad_norm" in with_steps


@pytest.fixture(scope="module")
def long_runs(tmp_path_factory) -> list[Path]:
    """Two 125-step runs (the seed's length: 50 stage-2 checkpoints), every checkpoint scored on 20 examples."""
    runs = tmp_path_factory.mktemp("long-runs")
    common = ["training.batch_size=2", "training.max_steps=125", "training.stage1_steps=75",
              "tracking.flush_every_steps=50", "eval.every_checkpoint=true", "eval.limit=20",
              "export.merged_model=false", "export.adapter=false"]
    return [loratrace.train(small_config(runs, *common, *extra), progress=False)
            for extra in ([], ["training.seed=7", "run.name=seed-7"])]


@pytest.mark.slow
def test_two_125_step_runs_fit_one_screen(long_runs):
    reference, other = map(str, long_runs)
    result = run_cli("compare", reference, other)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) <= 50, result.stdout
    assert max(map(len, lines)) <= 140
    assert "(10 of 50 evaluations; all: --section evals)" in result.stdout
    assert "seed-7: the order diverges from the reference's at step 1" in result.stdout
    evals = run_cli("compare", reference, other, "--section", "evals", "--format", "csv").stdout.splitlines()
    assert len(evals) == 1 + 50
