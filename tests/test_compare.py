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
    as_json = run_cli("compare", a, b, "--format", "json", "--output", str(out))
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
