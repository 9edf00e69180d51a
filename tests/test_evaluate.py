"""Evaluation: per-example multiple-choice scores of every checkpoint, queryable as the evals view."""

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli, small_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import loratrace
from loratrace.errors import CheckpointError
from loratrace.evaluate import EvalError, evaluate_run


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
    """16 updates, checkpoints 9..16, each scored on 40 validation rows while training."""
    cfg = small_config(tmp_path_factory.mktemp("eval-runs"), "eval.every_checkpoint=true", "eval.limit=40")
    return loratrace.train(cfg, progress=False)


def raw_evals(run):
    return pd.read_parquet(run / "tracking" / "evals")


def test_every_checkpoint_was_scored_during_training(evaluated_run):
    rows = raw_evals(evaluated_run)
    assert sorted(rows.checkpoint_step.unique()) == list(range(9, 17))
    assert (rows.groupby("checkpoint_step").size() == 40).all()
    events = EventAccumulator(str(evaluated_run / "tensorboard_logs"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/validation_accuracy")] == list(range(9, 17))


def test_accuracy_is_the_mean_of_independently_recomputed_correctness(evaluated_run):
    summary = evaluate_run(evaluated_run, "last", progress=False)
    assert list(summary.checkpoint_step) == [16]
    with loratrace.open_runs(evaluated_run) as db:
        rows = db.sql("SELECT * FROM evals WHERE checkpoint_step = 16").df()
    letters = "ABCDEFGHIJ"
    pred = [letters[int(np.argmax(ll))] for ll in rows.choice_logliks]
    correct = [p == g for p, g in zip(pred, rows.gold)]
    assert list(rows.pred) == pred and list(rows.correct) == correct
    assert summary.accuracy.iloc[0] == pytest.approx(np.mean(correct))
    p_gold = [np.exp(ll[letters.index(g)]) / np.exp(ll).sum() for ll, g in zip(rows.choice_logliks, rows.gold)]
    np.testing.assert_allclose(rows.p_gold, p_gold, rtol=1e-4)


def test_afterwards_equals_during_training_and_shows_once(evaluated_run):
    evaluate_run(evaluated_run, "9,12", progress=False)
    rows = raw_evals(evaluated_run)
    for step in (9, 12):
        runs = [g.sort_values("line") for _, g in rows[rows.checkpoint_step == step].groupby("evaluated_at")]
        assert len(runs) >= 2
        np.testing.assert_allclose(np.concatenate(list(runs[0].choice_logliks)),
                                   np.concatenate(list(runs[-1].choice_logliks)), atol=1e-5)
    with loratrace.open_runs(evaluated_run) as db:
        assert db.sql("SELECT count(*) FROM evals WHERE checkpoint_step = 9").fetchall() == [(40,)]
        acc = db.sql("SELECT checkpoint_step, avg(correct::INT) AS acc FROM evals GROUP BY 1 ORDER BY 1").df()
    assert list(acc.checkpoint_step) == list(range(9, 17))


def test_forgetting_between_checkpoints_is_one_query(evaluated_run):
    sql = """
        WITH seq AS (SELECT example_id, checkpoint_step, correct,
                            lag(correct) OVER (PARTITION BY example_id ORDER BY checkpoint_step) AS before
                     FROM evals)
        SELECT example_id, checkpoint_step FROM seq WHERE before AND NOT correct ORDER BY 1, 2"""
    with loratrace.open_runs(evaluated_run, read_only=True) as db:
        got = [tuple(r) for r in db.sql(sql).fetchall()]
        latest = db.sql("SELECT example_id, checkpoint_step, correct FROM evals ORDER BY 1, 2").df()
    expected = []
    for example_id, group in latest.groupby("example_id"):
        flags = list(group.correct)
        expected += [(example_id, s) for s, a, b in zip(group.checkpoint_step[1:], flags, flags[1:]) if a and not b]
    assert got == sorted(expected)


def test_text_scoring_scores_every_choice(evaluated_run):
    summary = evaluate_run(evaluated_run, "last", ["eval.scoring=text", "eval.limit=10"], progress=False)
    assert 0 <= summary.accuracy.iloc[0] <= 1
    rows = raw_evals(evaluated_run)
    text = rows[rows.scoring == "text"]
    assert len(text) == 10
    assert all(len(ll) >= 2 and max(ll) <= 0 for ll in text.choice_logliks)


def test_final_model_scores_like_the_last_checkpoint(evaluated_run):
    summary = evaluate_run(evaluated_run, "final", ["eval.limit=20"], progress=False)
    assert list(summary.checkpoint) == ["final_model"] and list(summary.checkpoint_step) == [16]
    rows = raw_evals(evaluated_run)
    final = rows[rows.checkpoint_path == "final_model"].sort_values("line")
    last = rows[(rows.checkpoint_step == 16) & (rows.checkpoint_path != "final_model")]
    last = last[last.evaluated_at == last.evaluated_at.min()].sort_values("line").head(20)
    np.testing.assert_allclose(np.concatenate(list(final.choice_logliks)), np.concatenate(list(last.choice_logliks)),
                               atol=1e-4)  # merged weights vs base + adapter: the same function


def test_mismatched_lora_is_one_checkpoint_error(evaluated_run):
    with pytest.raises(CheckpointError, match="has shape .* the model expects"):
        evaluate_run(evaluated_run, "last", ["lora.r=4"], progress=False)


@pytest.mark.parametrize("args, message", [
    (["--split", "nope"], "the bundled sample has no split 'nope'"),
    (["--checkpoints", "999"], "has no checkpoint at step 999"),
    (["--checkpoints", "17..20"], "has no checkpoint in steps 17..20 (its 8 checkpoint(s): steps 9..16)"),
    (["--checkpoints", "9..x"], "--checkpoints '9..x': use all, last, steps like 76,100, a range like 76..125"),
])
def test_cli_errors_exit_2(evaluated_run, args, message):
    result = run_cli("eval", str(evaluated_run), *args)
    assert result.returncode == 2 and message in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("loratrace: error:")


def test_cli_summary_names_the_best_checkpoint(evaluated_run, tmp_path):
    logs = evaluated_run / "tensorboard_logs"
    before = set(logs.glob("events.out.tfevents.*"))
    result = run_cli("eval", str(evaluated_run), "--checkpoints", "15,16", "--limit", "20")
    assert result.returncode == 0, result.stderr[-1000:]
    assert "accuracy" in result.stdout and "delta" in result.stdout and "best: checkpoints/" in result.stdout
    # each accuracy printed with its standard error (lm-evaluation-harness's), the best named only with it
    header, *rows, best = result.stdout.strip().splitlines()
    assert header.split() == ["checkpoint_step", "checkpoint", "accuracy", "stderr", "examples", "delta"]
    printed = {int(r.split()[0]): (float(r.split()[2]), float(r.split()[3])) for r in rows}
    assert sorted(printed) == [15, 16]
    for accuracy, error in printed.values():
        assert error == pytest.approx(np.sqrt(accuracy * (1 - accuracy) / 19), rel=1e-5)
    step = max(printed, key=lambda s: (printed[s][0], -s))
    other = 31 - step
    assert best.startswith(f"best: checkpoints/checkpoint-step-0{step}.ckpt (step {step}), accuracy "
                           f"{printed[step][0]:.4f} +/- {printed[step][1]:.4f} (stderr); ")
    noise = printed[step][0] - printed[other][0] < 1.96 * np.hypot(printed[step][1], printed[other][1])
    assert best.endswith(f"within the noise (1.96 combined stderr) of step {other}" if noise else
                         "above every other by more than 1.96 combined stderr")
    events = EventAccumulator(str(next(iter(set(logs.glob("events.out.tfevents.*")) - before))))
    events.Reload()
    stored = {e.step: e.value for e in events.Scalars("eval/validation_accuracy_stderr")}
    assert stored == {s: pytest.approx(e, rel=1e-5) for s, (_, e) in printed.items()}
    empty = tmp_path / "empty_run"
    (empty / "checkpoints").mkdir(parents=True)
    (empty / "config.yaml").write_text((evaluated_run / "config.yaml").read_text())
    missing = run_cli("eval", str(empty))
    assert missing.returncode == 2 and "has no checkpoints to evaluate" in missing.stderr


def test_a_range_and_last_select_as_in_export_and_influence(evaluated_run):
    before = set((evaluated_run / "tracking" / "evals").iterdir())
    summary = evaluate_run(evaluated_run, "9..10,last", ["eval.limit=4"], progress=False)
    assert list(summary.checkpoint_step) == [9, 10, 16]
    assert list(summary.checkpoint) == [f"checkpoints/checkpoint-step-{s:03d}.ckpt" for s in (9, 10, 16)]
    new = sorted(set((evaluated_run / "tracking" / "evals").iterdir()) - before)
    assert sorted(pd.concat(pd.read_parquet(p) for p in new).groupby("checkpoint_step").size().items()) == \
        [(9, 4), (10, 4), (16, 4)]


def test_truncated_checkpoint_is_one_line_exit_2(evaluated_run, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text((evaluated_run / "config.yaml").read_text())
    (run / "base_model").symlink_to(evaluated_run / "base_model")
    data = (evaluated_run / "checkpoints" / "checkpoint-step-016.ckpt").read_bytes()
    (run / "checkpoints" / "checkpoint-step-016.ckpt").write_bytes(data[: len(data) // 2])
    result = run_cli("eval", str(run), "--checkpoints", "last", "--limit", "4")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("loratrace: error:") and "checkpoint-step-016.ckpt: not a readable checkpoint" in last


def test_final_model_eval_logs_its_own_tensorboard_tag_and_leaves_no_empty_event_file(evaluated_run, tmp_path):
    import shutil

    logs = evaluated_run / "tensorboard_logs"
    before = set(logs.glob("events.out.tfevents.*"))
    evaluate_run(evaluated_run, "final", ["eval.limit=8"], progress=False)
    new = set(logs.glob("events.out.tfevents.*")) - before
    assert len(new) == 1
    events = EventAccumulator(str(next(iter(new))))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/validation_accuracy_final_model")] == [16]
    # A refused `--checkpoints final` (no final_model/) writes nothing, not even an empty event file.
    copy = tmp_path / "run"
    shutil.copytree(evaluated_run, copy, ignore=shutil.ignore_patterns("final_model", "tensorboard_logs"))
    with pytest.raises(EvalError, match="has no final_model/"):
        evaluate_run(copy, "final", progress=False)
    assert not (copy / "tensorboard_logs").exists()


def test_a_best_inside_the_noise_is_never_a_plain_winner():
    from loratrace.query.accuracy import best_line, stderr

    assert stderr(0.5, 1) is None and stderr(0.6, 10) == pytest.approx(np.sqrt(0.24 / 9))
    close = [("ckpt 9", "step 9", 0.60, stderr(0.60, 40)), ("ckpt 10", "step 10", 0.625, stderr(0.625, 40))]
    assert best_line(close) == ("best: ckpt 10, accuracy 0.6250 +/- 0.0775 (stderr); not a clear winner: within the "
                                "noise (1.96 combined stderr) of step 9")
    apart = [("ckpt 9", "step 9", 0.30, stderr(0.30, 1000)), ("ckpt 10", "step 10", 0.60, stderr(0.60, 1000))]
    assert best_line(apart).endswith("; above every other by more than 1.96 combined stderr")
    assert best_line(apart[:1]) == "best: ckpt 9, accuracy 0.3000 +/- 0.0145 (stderr)"
