"""The SQL of the views (docs/ARCHITECTURE.md, "Query layer"), created in this order over the raw views of store.py
(`batches_raw`, `examples_raw`, `checkpoints_raw`, `attempts_raw`, `evals_raw`, `trials_raw`, `influence_raw`,
`validations_raw`) and
its `runs_info`, `checkpoint_files` and `lineage`.

A run whose samples index is current (it covers exactly the run's batch, attempt and checkpoint parts on disk: a
finished run) is read from it, `samples_flat_raw`: its effective samples already flat, with their checkpoints. Every
other run (one still training, resumed, or without an index) is read as before, by unnesting its effective batches
(`batches_unflat_raw`, its batch parts). Both give the same rows (tests/test_flat_samples.py).
"""

from __future__ import annotations

from loratrace.query.samples_index import SAMPLE_COLUMNS, TRACE_COLUMNS

# A row is effective when its attempt owns its step in the run's lineage (track.lineage.effective_ranges).
EFFECTIVE = ("l.run_id = {t}.run_id AND (l.attempt IS NULL OR l.attempt = {t}.attempt) "
             "AND {t}.step > l.lo AND (l.hi IS NULL OR {t}.step <= l.hi)")
TRACE_SELECT = ", ".join("e." + c if c in ("checkpoint_step", "checkpoint_path", "first") else "s." + c
                         for c in TRACE_COLUMNS)
STEP_CHECKPOINT = """CREATE OR REPLACE VIEW {view} AS
        WITH steps AS (SELECT DISTINCT run_id, step FROM {batches}),
             saved AS (SELECT run_id, list(DISTINCT step ORDER BY step) AS saved_steps
                       FROM checkpoints GROUP BY run_id),
             paths AS (SELECT run_id, step, min(path) AS path FROM checkpoints GROUP BY run_id, step),
             first AS (SELECT s.run_id, s.step, first_checkpoint(s.step, coalesce(v.saved_steps, [])) AS checkpoint_step
                       FROM steps s LEFT JOIN saved v USING (run_id))
        SELECT f.run_id, f.step, f.checkpoint_step, p.path AS checkpoint_path
        FROM first f LEFT JOIN paths p ON p.run_id = f.run_id AND p.step = f.checkpoint_step"""

VIEWS = [
    f"""CREATE OR REPLACE VIEW batches_all AS
        SELECT b.*, NOT EXISTS (SELECT 1 FROM lineage l WHERE {EFFECTIVE.format(t='b')}) AS orphaned
        FROM batches_raw b""",
    "CREATE OR REPLACE VIEW batches AS SELECT * EXCLUDE (orphaned) FROM batches_all WHERE NOT orphaned",
    f"""CREATE OR REPLACE VIEW checkpoints AS
        SELECT c.run_id, c.attempt, c.step, c.path, c.bytes, c.created_at, r.dir || '/' || c.path AS file
        FROM checkpoints_raw c LEFT JOIN runs_info r USING (run_id)
        WHERE EXISTS (SELECT 1 FROM lineage l WHERE {EFFECTIVE.format(t='c')})""",
    f"""CREATE OR REPLACE VIEW batches_unflat AS SELECT b.* FROM batches_unflat_raw b
        WHERE EXISTS (SELECT 1 FROM lineage l WHERE {EFFECTIVE.format(t='b')})""",
    """CREATE OR REPLACE VIEW samples_unflat AS
        SELECT run_id, attempt, step, micro_batch, rank, epoch, batch_idx, stage, lr,
               unnest(range(len(example_ids))) AS position,
               unnest(example_ids) AS example_id, unnest(lines) AS line,
               unnest(losses) AS loss, unnest(p_gold) AS p_gold, unnest(correct) AS correct
        FROM batches_unflat""",
    f"""CREATE OR REPLACE VIEW samples AS
        SELECT * FROM samples_unflat UNION ALL SELECT {', '.join(SAMPLE_COLUMNS)} FROM samples_flat_raw""",
    "CREATE OR REPLACE VIEW examples AS SELECT * FROM examples_raw",
    "CREATE OR REPLACE VIEW attempts AS SELECT * FROM attempts_raw",
    # Re-evaluating replaces nothing on disk; the latest evaluation of each (run, what was scored: a checkpoint file
    # or final_model, split, scoring, example) shows. final_model and the last checkpoint share a step, and label
    # and text scoring are different measurements: neither hides the other.
    """CREATE OR REPLACE VIEW evals AS SELECT * FROM evals_raw
        QUALIFY row_number() OVER (PARTITION BY run_id, checkpoint_path, split, scoring, example_id
                                   ORDER BY evaluated_at DESC) = 1""",
    # Computing the same term again (another set of test examples sharing one, say) adds parts; the latest shows.
    # A row computed before its checkpoint was written again, or (tracin) before its step's batches were tracked
    # again, is stale (a resume rewrote them): it does not show, even if no newer computation replaced it.
    """CREATE OR REPLACE VIEW influence AS SELECT * FROM influence_raw i
        WHERE NOT EXISTS (SELECT 1 FROM checkpoints_raw c WHERE c.run_id = i.run_id AND c.path = i.checkpoint_path
                                                          AND c.created_at > i.computed_at)
          AND NOT (i.method = 'tracin' AND EXISTS (SELECT 1 FROM batches_raw b WHERE b.run_id = i.run_id
                                                   AND b.step = i.step AND b.wall_time > i.computed_at))
        QUALIFY row_number() OVER (PARTITION BY run_id, method, project_dim, test_split, test_example_id,
                                                train_example_id, train_line, step ORDER BY computed_at DESC) = 1""",
    # `influence --validate` run again with the same arguments adds a part; the latest shows.
    """CREATE OR REPLACE VIEW validations AS SELECT * FROM validations_raw
        QUALIFY row_number() OVER (PARTITION BY run_id, method, project_dim, test_split, test_example_id, subsets,
                                                fraction, seed, from_step, to_step ORDER BY computed_at DESC) = 1""",
    # `influence --validate --loo K` run again with the same arguments adds a part; the latest shows.
    """CREATE OR REPLACE VIEW leave_one_out AS SELECT * FROM leave_one_out_raw
        QUALIFY row_number() OVER (PARTITION BY run_id, method, project_dim, test_split, test_example_id,
                                                train_example_id, from_step, to_step ORDER BY computed_at DESC) = 1""",
    # Step -> first checkpoint: `first_checkpoint` is mappings.first_checkpoint, registered by store.py, the one rule
    # the tracker's mapping files use too. It runs once per (run, step); examples join to its answer. The unflat
    # runs' own (the flat ones hold theirs): what example_checkpoint_unflat joins, no flat run's batches read.
    STEP_CHECKPOINT.format(view="step_checkpoint", batches="batches"),
    STEP_CHECKPOINT.format(view="step_checkpoint_unflat", batches="batches_unflat"),
    """CREATE OR REPLACE VIEW example_checkpoint_unflat AS
        WITH seen AS (SELECT DISTINCT run_id, example_id, line, step FROM samples_unflat)
        SELECT s.run_id, s.example_id, s.line, s.step, c.checkpoint_step, c.checkpoint_path,
               row_number() OVER (PARTITION BY s.run_id, s.example_id, s.line ORDER BY s.step) = 1 AS first
        FROM seen s JOIN step_checkpoint_unflat c USING (run_id, step)""",
    """CREATE OR REPLACE VIEW example_checkpoint AS
        SELECT * FROM example_checkpoint_unflat
        UNION ALL SELECT DISTINCT run_id, example_id, line, step, checkpoint_step, checkpoint_path, first
                  FROM samples_flat_raw""",
    f"""CREATE OR REPLACE VIEW example_trace AS
        SELECT {TRACE_SELECT}
        FROM samples_unflat s JOIN example_checkpoint_unflat e USING (run_id, example_id, line, step)
        UNION ALL SELECT {', '.join(TRACE_COLUMNS)} FROM samples_flat_raw""",
    """CREATE OR REPLACE VIEW metrics AS
        WITH per_step AS (
            SELECT run_id, step,
                   sum(loss * n_target_tokens) / sum(n_target_tokens) AS "train/loss",
                   max(grad_norm) AS "train/grad_norm", max(lr) AS "train/lr",
                   avg(list_avg(correct::INT[])) AS "train/accuracy"
            FROM batches GROUP BY run_id, step)
        UNPIVOT per_step ON "train/loss", "train/grad_norm", "train/lr", "train/accuracy"
        INTO NAME name VALUE value""",
    # Accuracy of each evaluation (a checkpoint or final_model, a split, a scoring) with its standard error as
    # lm-evaluation-harness reports it: the sample standard deviation of the 0/1 scores over sqrt(n),
    # sqrt(acc * (1 - acc) / (n - 1)); NULL for one example.
    """CREATE OR REPLACE VIEW eval_accuracy AS
        SELECT run_id, checkpoint_step, checkpoint_path, split, scoring, count(*) AS examples,
               avg(correct::INT) AS accuracy,
               CASE WHEN count(*) > 1 THEN sqrt(avg(correct::INT) * (1 - avg(correct::INT)) / (count(*) - 1)) END
                   AS stderr,
               max(evaluated_at) AS evaluated_at
        FROM evals GROUP BY run_id, checkpoint_step, checkpoint_path, split, scoring""",
    # A sweep's trials (trials.parquet of each study folder found), joinable to every view by run_id.
    "CREATE OR REPLACE VIEW trials AS SELECT * FROM trials_raw",
    # missing_steps: steps 1..steps (the last tracked) with no effective batch row (a batches part deleted or lost):
    # the run's tracked history has a gap there. An untracked run's checkpoints are its checkpoint files (store.py's
    # `checkpoint_files`); a tracked run's come from its tracking parts, in its lineage.
    # final_loss: the last tracked step's train/loss, else run.json's (an untracked run). best_eval_*: the evaluation
    # with the highest accuracy (the earliest step of equals), any split or scoring (best_eval_split names it).
    # replay_of_run/_of_step/_end_step/_dropped/_dropped_ids: a replay's origin (run.json's replay_of), else NULL.
    """CREATE OR REPLACE VIEW runs AS
        SELECT r.* REPLACE (coalesce(string_split(r.tags, ','), CAST([] AS VARCHAR[])) AS tags,
                            TRY_CAST(r.duration_s AS DOUBLE) AS duration_s,
                            coalesce(m.final_loss, TRY_CAST(r.final_loss AS DOUBLE)) AS final_loss,
                            TRY_CAST(r.replay_of_step AS BIGINT) AS replay_of_step,
                            TRY_CAST(r.replay_end_step AS BIGINT) AS replay_end_step,
                            TRY_CAST(r.replay_dropped AS BIGINT) AS replay_dropped),
               s.steps, n.examples_seen, coalesce(c.checkpoints, f.checkpoints) AS checkpoints,
               coalesce(c.last_checkpoint_step, f.last_checkpoint_step) AS last_checkpoint_step,
               s.steps - s.distinct_steps AS missing_steps,
               e.accuracy AS best_eval_accuracy, e.stderr AS best_eval_stderr, e.checkpoint_step AS best_eval_step,
               e.split AS best_eval_split, e.examples AS best_eval_examples
        FROM runs_info r
        LEFT JOIN (SELECT run_id, arg_max(value, step) AS final_loss FROM metrics WHERE name = 'train/loss'
                   GROUP BY run_id) m USING (run_id)
        LEFT JOIN (SELECT * FROM eval_accuracy
                   QUALIFY row_number() OVER (PARTITION BY run_id ORDER BY accuracy DESC, checkpoint_step,
                                                                    checkpoint_path) = 1) e USING (run_id)
        LEFT JOIN (SELECT run_id, max(step) AS steps, count(DISTINCT step) FILTER (WHERE step >= 1) AS distinct_steps
                   FROM batches GROUP BY run_id) s USING (run_id)
        LEFT JOIN (SELECT run_id, sum(len(example_ids)) AS examples_seen FROM batches_unflat GROUP BY run_id
                   UNION ALL SELECT run_id, count(*) FROM samples_flat_raw GROUP BY run_id) n USING (run_id)
        LEFT JOIN (SELECT run_id, count(*) AS checkpoints, max(step) AS last_checkpoint_step
                   FROM checkpoints GROUP BY run_id) c USING (run_id)
        LEFT JOIN (SELECT run_id, count(*) AS checkpoints, max(step) AS last_checkpoint_step
                   FROM checkpoint_files GROUP BY run_id) f USING (run_id)""",
]
VIEW_NAMES = ("runs", "batches", "batches_all", "samples", "examples", "checkpoints", "attempts", "step_checkpoint",
              "example_checkpoint", "metrics", "example_trace", "evals", "eval_accuracy", "trials", "influence",
              "validations", "leave_one_out")
