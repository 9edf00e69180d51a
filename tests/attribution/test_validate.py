"""`loratrace influence --validate`: TracIn's LDS against replays of the session's small run (a copy: the validation
writes its rows into the run)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import run_cli

import loratrace


@pytest.mark.slow
def test_validate_scores_tracin_against_replays_and_fills_the_view(small_run, tmp_path):
    run = tmp_path / "runs" / small_run.name
    shutil.copytree(small_run, run)
    result = run_cli("influence", str(run), "--validate", "--method", "tracin", "--subsets", "3", "--limit", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith(
        "LDS over 3 replays of steps 10-16 without 0.5 of the tail's examples each, 3 validation example(s); random "
        "scores: ")
    with loratrace.open_runs(run) as db:
        rows = db.sql("SELECT * FROM validations ORDER BY method, test_example_id").df()
    assert sorted(set(rows.method)) == ["random", "tracin"] and len(rows) == 6
    assert (rows.subsets == 3).all() and (rows.from_step == 9).all() and (rows.to_step == 16).all()
    for _, group in rows.groupby("method"):
        defined = group.spearman.dropna()
        assert defined.between(-1, 1).all() and np.isclose(group.lds.iloc[0], defined.mean())
        assert group.lds_low.iloc[0] <= group.lds.iloc[0] <= group.lds_high.iloc[0]


def test_validate_refuses_what_it_cannot_measure(small_run):
    for args, message in ((["--subsets", "2"], "--subsets must be at least 3"),
                          (["--fraction", "1"], "--fraction must lie between 0 and 1, got 1.0")):
        result = run_cli("influence", str(small_run), "--validate", *args)
        assert result.returncode == 2 and message in result.stderr and len(result.stderr.splitlines()) == 1


@pytest.mark.slow
def test_the_ground_truth_is_the_replays_loss_change(small_run, tmp_path):
    """Subset m's actual change is the loss after a replay without its examples minus the run's own."""
    from loratrace.attribution.validate import _encode, _losses, _tests, ground_truth
    from loratrace.proof.engine import Engine
    from loratrace.proof.replay import replays
    from loratrace.training.model import load_lora_weights

    run = tmp_path / "runs" / small_run.name
    shutil.copytree(small_run, run)
    engine = Engine(run)
    truth = ground_truth(engine, 3, 0.25, 7, "validation", None, 2, progress=False)
    assert truth.masks.shape == (3, len(truth.tail)) and (truth.masks.sum(axis=1) == round(len(truth.tail) / 4)).all()
    dropped = [t for t, drop in zip(truth.tail, truth.masks[1]) if drop]
    made, = replays(run, truth.start, [dropped], engine=engine)
    encoded = _encode(engine, _tests(engine, "validation", None, 2))
    load_lora_weights(engine.model, made / "checkpoints" / f"checkpoint-step-{truth.end:03d}.ckpt")
    after = _losses(engine, encoded)
    load_lora_weights(engine.model, run / "checkpoints" / f"checkpoint-step-{truth.end:03d}.ckpt")
    assert np.array_equal(after - _losses(engine, encoded), truth.actual[1]) and truth.actual[1].any()


@pytest.mark.slow
def test_leave_one_out_replays_each_top_example_alone(small_run, tmp_path):
    """--loo 1: the test example's most helpful and most harmful examples by TracIn's scores, each replayed away alone;
    the actual change is that replay's loss minus the run's (checked against a `replays` of its own)."""
    from loratrace.attribution.validate import _encode, _losses, _tests
    from loratrace.proof.engine import Engine
    from loratrace.proof.replay import replays
    from loratrace.training.model import load_lora_weights

    run = tmp_path / "runs" / small_run.name
    shutil.copytree(small_run, run)
    result = run_cli("influence", str(run), "--validate", "--method", "tracin", "--subsets", "3", "--limit", "1",
                     "--loo", "1")
    assert result.returncode == 0, result.stderr
    with loratrace.open_runs(run) as db:
        rows = db.sql("SELECT * FROM leave_one_out ORDER BY kind DESC").df()
        scores = db.sql("""SELECT train_example_id, sum(score) AS score FROM influence WHERE method = 'tracin'
                           GROUP BY ALL ORDER BY score DESC, train_example_id""").df()
    assert list(rows.kind) == ["helpful", "harmful"] and list(rows["rank"]) == [1, 1]
    assert (rows.from_step == 9).all() and (rows.to_step == 16).all() and rows.test_example_id.nunique() == 1
    assert np.isclose(rows.predicted_change.iloc[0], scores.score.max())
    assert np.isclose(rows.predicted_change.iloc[1], scores.score.min())
    assert "== leave-one-out: 1 most helpful and harmful per test example ==" in result.stdout
    assert all(train_id in result.stdout for train_id in rows.train_example_id)
    engine = Engine(run)
    encoded = _encode(engine, _tests(engine, "validation", None, 1))
    made, = replays(run, 9, [[rows.train_example_id.iloc[0]]], engine=engine)
    load_lora_weights(engine.model, made / "checkpoints" / "checkpoint-step-016.ckpt")
    after = _losses(engine, encoded)
    load_lora_weights(engine.model, run / "checkpoints" / "checkpoint-step-016.ckpt")
    assert np.isclose(after - _losses(engine, encoded), rows.actual_change.iloc[0], rtol=0, atol=1e-12).all()
    assert rows.actual_change.iloc[0] != 0
