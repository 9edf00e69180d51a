"""Views over hand-built Parquet (orphans, two runs, a truncated part) and over a real tracked run."""

import datetime as dt

import pandas as pd
import pyarrow as pa
import pytest

import loratrace
from loratrace.query.store import StoreError
from loratrace.track import schema

T0 = dt.datetime(2025, 7, 20, tzinfo=dt.timezone.utc)


def _batch(run_id, attempt, step, ids, lines):
    return {"run_id": run_id, "attempt": attempt, "step": step, "micro_batch": 0, "rank": 0, "epoch": 0,
            "batch_idx": step - 1, "stage": 1, "example_ids": ids, "lines": lines, "losses": [1.0 * step] * len(ids),
            "p_gold": [0.5] * len(ids), "correct": [step % 2 == 0] * len(ids), "loss": 1.0 * step, "grad_norm": 0.1,
            "lr": 1e-4, "n_tokens": 10, "n_target_tokens": len(ids), "wall_time": T0}


def _write_run(root, run_id, batches, checkpoints, attempts, untrained=("w",)):
    tracking = root / run_id / "tracking"
    (root / run_id / "run.json").parent.mkdir(parents=True)
    (root / run_id / "run.json").write_text(f'{{"run_id": "{run_id}", "dataset": "arc-challenge"}}')
    examples = {(i, n) for rows in batches for row in rows for i, n in zip(row["example_ids"], row["lines"])}
    examples |= {(example_id, 100 + n) for n, example_id in enumerate(untrained)}
    schema.write_atomic(pa.Table.from_pylist([{"run_id": run_id, "example_id": i, "line": n, "split": "train"}
                                              for i, n in sorted(examples)], schema=schema.EXAMPLES),
                        tracking / schema.EXAMPLES_FILE)
    for n, rows in enumerate(batches):  # the names the tracker writes: only those are read
        schema.write_atomic(pa.Table.from_pylist(rows, schema=schema.BATCHES),
                            tracking / "batches" / schema.batches_part_name(rows[0]["attempt"], 0, n))
    ckpts = [{"run_id": run_id, "attempt": a, "step": s, "path": f"checkpoints/checkpoint-step-{s:03d}.ckpt",
              "bytes": 10, "created_at": T0} for a, s in checkpoints]
    schema.write_atomic(pa.Table.from_pylist(ckpts, schema=schema.CHECKPOINTS),
                        tracking / "checkpoints" / schema.checkpoints_part_name(0, 0))
    rows = [{"run_id": run_id, "attempt": a, "parent_attempt": p, "started_at": T0, "resumed_from": None,
             "resumed_step": r, "world_size": 1, "host": "h"} for a, p, r in attempts]
    schema.write_atomic(pa.Table.from_pylist(rows, schema=schema.ATTEMPTS),
                        tracking / "attempts" / schema.attempts_part_name(0))


@pytest.fixture
def two_runs(tmp_path):
    # run A: attempt 0 trained 1..4 (ckpts 2, 4), crashed after 4; attempt 1 resumed from 2 and trained 3..5 (ckpt 4)
    _write_run(tmp_path, "A", [[_batch("A", 0, s, [f"x{s}", "y"], [s, 9]) for s in range(1, 5)],
                               [_batch("A", 1, s, [f"z{s}", "y"], [10 + s, 9]) for s in range(3, 6)]],
               checkpoints=[(0, 2), (0, 4), (1, 4)], attempts=[(0, None, 0), (1, 0, 2)])
    _write_run(tmp_path, "B", [[_batch("B", 0, s, ["y"], [9]) for s in (1, 2)]], checkpoints=[(0, 2)],
               attempts=[(0, None, 0)])
    return tmp_path


def test_views_show_the_effective_lineage_once(two_runs):
    with loratrace.open_runs(two_runs) as db:
        steps = db.sql("SELECT run_id, attempt, step FROM batches ORDER BY run_id, step").fetchall()
        assert steps == [("A", 0, 1), ("A", 0, 2), ("A", 1, 3), ("A", 1, 4), ("A", 1, 5), ("B", 0, 1), ("B", 0, 2)]
        orphaned = db.sql("SELECT run_id, attempt, step FROM batches_all WHERE orphaned ORDER BY step").fetchall()
        assert orphaned == [("A", 0, 3), ("A", 0, 4)]
        assert db.sql("SELECT run_id, attempt, step FROM checkpoints ORDER BY run_id, step").fetchall() == [
            ("A", 0, 2), ("A", 1, 4), ("B", 0, 2)]
        step_map = db.sql("SELECT step, checkpoint_step FROM step_checkpoint WHERE run_id = 'A' ORDER BY step")
        assert step_map.fetchall() == [(1, 2), (2, 2), (3, 4), (4, 4), (5, None)]
        runs = db.sql("SELECT run_id, steps, checkpoints FROM runs ORDER BY run_id").fetchall()
        assert runs == [("A", 5, 2), ("B", 2, 1)]


def test_trace_matches_an_independent_computation(two_runs):
    with loratrace.open_runs(two_runs) as db:
        frame = db.trace("y")
    expected = [("A", 1, 2), ("A", 2, 2), ("A", 3, 4), ("A", 4, 4), ("A", 5, None), ("B", 1, 2), ("B", 2, 2)]
    got = [(r, s, None if pd.isna(c) else int(c)) for r, s, c in zip(frame.run_id, frame.step, frame.checkpoint_step)]
    assert got == expected
    assert frame.groupby("run_id")["first"].sum().tolist() == [1, 1]
    assert frame[frame["first"]].step.tolist() == [1, 1]
    assert (frame.line == 9).all()


def test_trace_unknown_id_suggests_the_closest(two_runs):
    with loratrace.open_runs(two_runs) as db, pytest.raises(StoreError, match=r"no run trained example id 'z33'.*z3"):
        db.trace("z33")


def test_truncated_part_is_skipped_with_a_warning(two_runs):
    part = two_runs / "A" / "tracking" / "batches" / schema.batches_part_name(1, 0, 1)
    part.write_bytes(part.read_bytes()[:100])
    with pytest.warns(UserWarning, match="skipping unreadable tracking part"):
        db = loratrace.open_runs(two_runs / "A")
    # attempt 1's rows went with the part; its attempt record still orphans attempt 0's steps 3 and 4
    assert db.sql("SELECT max(step) FROM batches").fetchall() == [(2,)]
    assert db.sql("SELECT count(*) FROM batches_all").fetchall() == [(4,)]
    db.close()


@pytest.mark.parametrize("sql", [
    "COPY (SELECT 1) TO 'x.csv'", "ATTACH 'x.duckdb'", "INSTALL httpfs", "LOAD httpfs",
    "CREATE TABLE t AS SELECT 1", "SELECT * FROM read_csv('/etc/passwd')", "SET enable_external_access = true",
    "SELECT 1; SELECT 2",
])
def test_read_only_connection_refuses_escapes(two_runs, sql):
    with loratrace.open_runs(two_runs, read_only=True) as db, pytest.raises(StoreError):
        db.sql(sql).fetchall()


def test_read_only_connection_still_answers_queries(two_runs):
    with loratrace.open_runs(two_runs, read_only=True) as db:
        assert db.sql("SELECT count(*) FROM samples WHERE example_id = ?", ["y"]).fetchall() == [(7,)]


def test_views_over_a_real_run_see_new_parts(small_run, tmp_path):
    with loratrace.open_runs(small_run) as db:
        before = db.sql("SELECT count(*) FROM batches").fetchall()[0][0]
        assert before == 16
        extra = [_batch(small_run.name, 0, 99, ["new"], [0])]
        schema.write_atomic(pa.Table.from_pylist(extra, schema=schema.BATCHES),
                            small_run / "tracking" / "batches" / schema.batches_part_name(0, 0, 999))
        try:
            assert db.sql("SELECT count(*) FROM batches").fetchall()[0][0] == 17
            assert db.indexed_runs == []  # the index no longer covers every part: trace falls back to the views
            assert db.trace("new").step.tolist() == [99]
        finally:
            (small_run / "tracking" / "batches" / schema.batches_part_name(0, 0, 999)).unlink()


def test_samples_index_is_written_at_the_end_and_answers_like_the_views(small_run):
    from loratrace.query.store import TRACE_COLUMNS, TRACE_ORDER

    assert (small_run / "tracking" / "samples_index.parquet").is_file()
    with loratrace.open_runs(small_run, read_only=True) as db:
        assert db.indexed_runs == [small_run.name]
        ids = [r[0] for r in db.sql("SELECT DISTINCT example_id FROM samples ORDER BY 1 LIMIT 5").fetchall()]
        for example_id in ids:
            by_index = db.trace(example_id)
            by_views = db.sql(f"SELECT {', '.join(TRACE_COLUMNS)} FROM example_trace WHERE example_id = ? "
                              f"ORDER BY {TRACE_ORDER}", [example_id]).df()
            pd.testing.assert_frame_equal(by_index.reset_index(drop=True), by_views, check_dtype=False)


def test_listing_is_skipped_only_while_recent_and_unchanged(two_runs):
    import os
    import time

    from loratrace.query.store import Runs

    tracking = two_runs / "A" / "tracking"
    folders = [two_runs / "A", *(two_runs / "A").rglob("*")]  # every file and folder the listing looks at

    def stamp_folders(seconds_from_now: float) -> None:  # times set by hand: no race with the clock
        for folder in folders:
            os.utime(folder, (time.time() + seconds_from_now,) * 2)

    stamp_folders(+10)  # not yet settled when listed (as for a write inside the file system's clock tick)
    with Runs([two_runs / "A"]) as db:
        db.relist_after = 3600.0  # "recent" whatever this machine's speed; the age rule is checked last
        assert not db._unchanged()  # an unsettled folder time is never trusted
        stamp_folders(-10)
        before = db.sql("SELECT count(*) FROM batches_raw").fetchall()[0][0]  # re-lists: the times moved
        assert db._unchanged()  # listed after the folders settled, nothing moved: the next call skips the listing
        schema.write_atomic(pa.Table.from_pylist([_batch("A", 1, 6, ["late"], [6])], schema=schema.BATCHES),
                            tracking / "batches" / schema.batches_part_name(1, 0, 9))
        assert not db._unchanged()  # the folder's time moved
        assert db.sql("SELECT count(*) FROM batches_raw").fetchall()[0][0] == before + 1
        assert db.trace("late").step.tolist() == [6]
        db.relist_after = 0.0
        assert not db._unchanged()  # too old a listing is never trusted, whatever the folder times say


def test_trace_by_line_reads_the_index_too(small_run):
    with loratrace.open_runs(small_run, read_only=True) as db:
        assert db.indexed_runs == [small_run.name]
        example_id, line = db.sql("SELECT example_id, line FROM samples LIMIT 1").fetchall()[0]
        by_line, by_id = db.trace(line=line), db.trace(example_id)
        pd.testing.assert_frame_equal(by_line, by_id)


# ---------------------------------------------------------------------------------------------- issue #11

def test_foreign_files_are_reported_once_and_never_counted(two_runs):
    import warnings

    from loratrace.query.store import StoreWarning

    tracking = two_runs / "A" / "tracking"
    part = next((tracking / "batches").glob("a000-*.parquet"))
    foreign = [tracking / "batches" / "a000-r00-000000 (copy).parquet", tracking / "batches" / "old.parquet",
               tracking / "checkpoints" / "c.parquet", tracking / "attempts" / "backup.parquet",
               tracking / "evals" / "mine.parquet", tracking / "batches" / "notes.txt"]
    (tracking / "evals").mkdir()
    for path in foreign:
        path.write_bytes(part.read_bytes())  # readable Parquet with the right schema: only its name is wrong
    with pytest.warns(StoreWarning) as caught:
        db = loratrace.open_runs(two_runs)
    reported = [str(w.message) for w in caught]
    for path in foreign:
        assert sum(str(path) in message for message in reported) == 1, (path, reported)
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        assert db.sql("SELECT count(*) FROM batches WHERE run_id = 'A'").fetchall() == [(5,)]
        assert db.sql("SELECT count(*) FROM batches_all").fetchall() == [(9,)]
        assert db.sql("SELECT count(*) FROM checkpoints").fetchall() == [(3,)]
        assert db.sql("SELECT count(*) FROM attempts").fetchall() == [(3,)]
        assert db.sql("SELECT count(*) FROM evals").fetchall() == [(0,)]
    assert [w for w in again if issubclass(w.category, StoreWarning)] == []  # reported once, not at every query
    db.close()


def test_a_foreign_copy_of_a_part_does_not_stale_the_samples_index(small_run):
    part = sorted((small_run / "tracking" / "batches").iterdir())[0]
    copy = part.with_name("copy-of-" + part.name)
    copy.write_bytes(part.read_bytes())
    try:
        with pytest.warns(UserWarning, match="not a file name the tracker writes"):
            db = loratrace.open_runs(small_run, read_only=True)
        assert db.sql("SELECT count(*) FROM batches").fetchall() == [(16,)]
        assert db.indexed_runs == [small_run.name]
        db.close()
    finally:
        copy.unlink()


def test_a_deleted_examples_file_is_reported(two_runs):
    (two_runs / "B" / "tracking" / "examples.parquet").unlink()
    with pytest.warns(UserWarning, match=r"B/tracking/examples.parquet is missing: the examples view has no rows"):
        db = loratrace.open_runs(two_runs)
    assert db.sql("SELECT DISTINCT run_id FROM examples").fetchall() == [("A",)]
    db.close()


def test_trace_of_an_example_never_trained_says_so(two_runs):
    with loratrace.open_runs(two_runs) as db:
        with pytest.raises(StoreError, match=r"^example id 'w' is in the examples of run A, B but was never trained "
                                             r"\(so far\)$"):
            db.trace("w")
        with pytest.raises(StoreError, match=r"^line 100 is in the examples of run A, B but was never trained"):
            db.trace(line=100)
        with pytest.raises(StoreError, match=r"^run B did not train example id 'x1' \(run A did\)$"):
            db.trace("x1", run_id="B")


def test_trace_without_runs_or_tracked_rows_is_one_error(tmp_path):
    with loratrace.open_runs(tmp_path) as db, pytest.raises(StoreError, match=f"^no runs under {tmp_path}$"):
        db.trace("x")
    (tmp_path / "R" / "tracking" / "batches").mkdir(parents=True)  # a run in its first seconds
    (tmp_path / "R" / "run.json").write_text('{"run_id": "R"}')
    with loratrace.open_runs(tmp_path) as db, pytest.raises(StoreError, match="^no tracked batches yet under"):
        db.trace("x")


def test_runs_view_has_every_runs_config_keys_and_sees_new_runs(two_runs):
    (two_runs / "A" / "config.yaml").write_text("training:\n  max_steps: 5\n")
    (two_runs / "B" / "config.yaml").write_text("training:\n  max_steps: 2\nlate:\n  key: v\n")
    for read_only in (False, True):
        with loratrace.open_runs(two_runs, read_only=read_only) as db:
            rows = db.sql("SELECT run_id, training_max_steps, late_key FROM runs WHERE run_id < 'C' ORDER BY 1")
            rows = rows.fetchall()
            assert rows == [("A", "5", None), ("B", "2", "v")]
            run_id = f"C{int(read_only)}"
            _write_run(two_runs, run_id, [[_batch(run_id, 0, 1, ["c"], [0])]], checkpoints=[(0, 1)],
                       attempts=[(0, None, 0)])
            assert db.sql("SELECT run_id, steps FROM runs ORDER BY run_id").fetchall()[-1] == (run_id, 1)
            assert db.sql("SELECT count(*) FROM batches WHERE run_id = ?", [run_id]).fetchall() == [(1,)]
            assert db.trace("c", run_id=run_id).step.tolist() == [1]


def test_evals_keep_final_model_last_checkpoint_and_scorings_apart(small_run, tmp_path):
    import shutil

    from conftest import small_config

    from loratrace.config import save_config
    from loratrace.evaluate import evaluate_run

    run = tmp_path / small_run.name
    shutil.copytree(small_run, run)
    # The config small_run was trained with: a failed resume elsewhere in the suite (test_recipe's lora.r=4) rewrites
    # the shared run's config.yaml.
    save_config(small_config(tmp_path), run / "config.yaml")
    for which, overrides in (("last", []), ("final", []), ("last", ["eval.scoring=text"]), ("last", [])):
        evaluate_run(run, which, ["eval.limit=4", *overrides], progress=False)
    with loratrace.open_runs(run) as db:
        groups = db.sql("SELECT checkpoint_path, checkpoint_step, scoring, count(*) FROM evals "
                        "GROUP BY ALL ORDER BY ALL").fetchall()
        assert groups == [("checkpoints/checkpoint-step-016.ckpt", 16, "label", 4),
                          ("checkpoints/checkpoint-step-016.ckpt", 16, "text", 4), ("final_model", 16, "label", 4)]
        assert db.sql("SELECT count(*) FROM evals_raw").fetchall() == [(16,)]  # the re-run replaced the first


def _write_evals(run_dir, run_id, step, correct):
    rows = [{"run_id": run_id, "checkpoint_step": step, "checkpoint_path": f"checkpoints/checkpoint-step-{step}.ckpt",
             "split": "validation", "scoring": "label", "example_id": f"v{n}", "line": n, "gold": "A",
             "pred": "A" if ok else "B", "correct": ok, "p_gold": 0.5, "choice_logliks": [0.0, 0.0], "evaluated_at": T0}
            for n, ok in enumerate(correct)]
    schema.write_atomic(pa.Table.from_pylist(rows, schema=schema.EVALS),
                        run_dir / "tracking" / "evals" / schema.evals_part_name(step, T0, f"{step:08x}"))


def test_runs_view_shows_name_tags_duration_final_loss_and_best_eval_with_stderr(two_runs):
    import json
    import math

    (two_runs / "B" / "run.json").write_text(json.dumps({
        "run_id": "B", "name": "baseline", "tags": ["lr", "seed 7"], "status": "completed", "final_loss": 9.5,
        "attempts": [{"started_at": "2025-07-20T10:00:00+00:00", "ended_at": "2025-07-20T10:01:30+00:00"},
                     {"started_at": "2025-07-20T11:00:00+00:00", "ended_at": "2025-07-20T11:00:10+00:00"}]}))
    _write_evals(two_runs / "B", "B", 1, [True] * 3 + [False] * 7)  # 0.3 of 10
    _write_evals(two_runs / "B", "B", 2, [True] * 6 + [False] * 4)  # 0.6 of 10: the best
    with loratrace.open_runs(two_runs, read_only=True) as db:
        rows = {r[0]: r[1:] for r in db.sql(
            "SELECT run_id, name, tags, duration_s, final_loss, best_eval_accuracy, best_eval_stderr, best_eval_step, "
            "best_eval_split, best_eval_examples FROM runs").fetchall()}
        accuracy = db.sql("SELECT checkpoint_step, examples, accuracy, stderr FROM eval_accuracy ORDER BY 1").fetchall()
    # B: two launches of 90 s and 10 s; its last tracked step's loss (2.0), not run.json's; the 0.6 at step 2
    assert rows["B"][:4] == ("baseline", ["lr", "seed 7"], 100.0, 2.0)
    assert rows["B"][4:] == (pytest.approx(0.6), pytest.approx(math.sqrt(0.6 * 0.4 / 9)), 2, "validation", 10)
    assert rows["A"] == (None, [], None, 5.0, None, None, None, None, None)
    assert accuracy == [(1, 10, pytest.approx(0.3), pytest.approx(math.sqrt(0.3 * 0.7 / 9))),
                        (2, 10, pytest.approx(0.6), pytest.approx(math.sqrt(0.6 * 0.4 / 9)))]
