"""What the report knows per training example and per step's batch, read once through the views: the rows of the
report's examples table, each step's whole batch (the curves' hover and click), accuracy with its standard error per
evaluated checkpoint, and the influence terms' totals.

Everything here is plain data (DataFrames, or lists ready for JSON); report/sections.py turns it into HTML.
"""

from __future__ import annotations

import math

import pandas as pd

from loratrace.report.compare import LAST_EVALUATED
from loratrace.report.html import Script

TRAJECTORY_POINTS = 40  # p(gold) points kept per example for its sparkline (evenly spaced, the last always kept)
PROMPT_CHARS = 160  # the prompt excerpt in the examples table

# Per run and example: exposures, the first step, p(gold) at each exposure in training order (TRAJECTORY_POINTS of
# them at most, evenly spaced, first and last kept), correct at the last, and forgetting events: correct at one
# exposure, wrong at the next (compare.FORGETTING's rule, over the same order, counted from the ordered list the report
# reads anyway instead of a second pass over every sample). The first checkpoint: `first_checkpoint`, the one rule of
# the step_checkpoint view, asked once per example.
PER_EXAMPLE = f"""WITH ordered AS (
    SELECT run_id, example_id, count(*) AS exposures, min(step) AS first_step,
           list({{'p': p_gold, 'c': correct}} ORDER BY step, micro_batch, rank, position) AS seen
    FROM samples GROUP BY ALL),
per AS (
    SELECT run_id, example_id, exposures, first_step, seen[-1].c AS correct_last_seen,
           list_transform(CASE WHEN len(seen) <= {TRAJECTORY_POINTS} THEN seen
                               ELSE list_transform(range({TRAJECTORY_POINTS}), lambda i:
                                    seen[1 + round(i * (len(seen) - 1) / {TRAJECTORY_POINTS - 1})::INT]) END,
                          lambda x: CASE WHEN isfinite(x.p) THEN round(x.p::DOUBLE, 3) END) AS trajectory,
           len(list_filter(range(1, len(seen)), lambda i: seen[i].c AND NOT seen[i + 1].c)) AS forgetting_events
    FROM ordered),
saved AS (SELECT run_id, list(DISTINCT step ORDER BY step) AS saved_steps FROM checkpoints GROUP BY run_id),
prompts AS (SELECT run_id, example_id, left(any_value(prompt ORDER BY line), {PROMPT_CHARS}) AS prompt
            FROM examples GROUP BY ALL),
evaluated AS (SELECT run_id, example_id, first(correct ORDER BY scoring <> 'label', split) AS correct_last_eval
              FROM ({LAST_EVALUATED}) GROUP BY ALL),
influence AS (SELECT run_id, train_example_id AS example_id, sum(score) AS influence FROM influence GROUP BY ALL)
SELECT per.run_id, per.example_id, p.prompt, per.exposures,
       first_checkpoint(per.first_step, coalesce(v.saved_steps, [])) AS first_checkpoint, per.trajectory,
       per.forgetting_events, per.correct_last_seen, e.correct_last_eval, i.influence
FROM per
LEFT JOIN saved v ON v.run_id = per.run_id
LEFT JOIN prompts p ON p.run_id = per.run_id AND p.example_id = per.example_id
LEFT JOIN evaluated e ON e.run_id = per.run_id AND e.example_id = per.example_id
LEFT JOIN influence i ON i.run_id = per.run_id AND i.example_id = per.example_id
ORDER BY per.run_id, per.example_id"""

# Per run, as JSON text: its steps, and each step's whole batch in the order the step met it (micro-batch, rank,
# position): each member as its index among the run's examples in id order (its row in the examples table, after the
# run's offset), negated minus one where the model got it wrong (-i - 1), and its loss (3 decimals; null if not
# finite). Built by DuckDB: a 10,000-step run's 320,000 members never become Python objects.
STEP_BATCHES = """WITH indexed AS (
    SELECT run_id, example_id, (row_number() OVER (PARTITION BY run_id ORDER BY example_id) - 1)::INT AS i
    FROM (SELECT DISTINCT run_id, example_id FROM samples)),
per_step AS (
    SELECT s.run_id, s.step,
           to_json(list(CASE WHEN s.correct THEN x.i ELSE -x.i - 1 END ORDER BY micro_batch, rank, position)) AS ids,
           to_json(list(CASE WHEN isfinite(s.loss) THEN round(s.loss::DOUBLE, 3) END
                        ORDER BY micro_batch, rank, position)) AS losses
    FROM samples s JOIN indexed x USING (run_id, example_id) GROUP BY s.run_id, s.step)
SELECT run_id, to_json(list(step ORDER BY step)), string_agg(ids, ',' ORDER BY step),
       string_agg(losses, ',' ORDER BY step)
FROM per_step GROUP BY run_id"""

# Per run, split, scoring and checkpoint evaluated: accuracy and the examples scored.
EVAL_ACCURACY = """SELECT run_id, checkpoint_step, checkpoint_path = 'final_model' AS final_model, split, scoring,
       avg(correct::INT) AS accuracy, count(*) AS examples
FROM evals GROUP BY ALL ORDER BY ALL"""

# Per run, method and training example: the influence summed over its terms and over the test examples.
INFLUENCE = """SELECT run_id, method, train_example_id, sum(score) AS score, count(*) AS terms,
       count(DISTINCT test_example_id) AS test_examples
FROM influence GROUP BY ALL ORDER BY run_id, method, score DESC"""


def stderr(accuracy: float, n: int) -> float | None:
    """The standard error of an accuracy over `n` examples as lm-evaluation-harness computes it (the sample standard
    deviation of 0/1 scores over sqrt(n)): sqrt(acc * (1 - acc) / (n - 1)); None for fewer than two examples."""
    return math.sqrt(accuracy * (1 - accuracy) / (n - 1)) if n > 1 else None


def eval_accuracy(db) -> pd.DataFrame:
    """One row per run, split, scoring and checkpoint evaluated: accuracy, examples, stderr."""
    frame = db.sql(EVAL_ACCURACY).df()
    frame["stderr"] = [stderr(a, int(n)) for a, n in zip(frame.accuracy, frame.examples)]
    return frame


def influence_totals(db) -> pd.DataFrame:
    return db.sql(INFLUENCE).df()


def example_rows(db, run_index: dict[str, int]) -> list[list]:
    """The examples table's rows, in (run id, example id) order: [run (its index in the report), id, prompt excerpt,
    exposures, first checkpoint, p(gold) trajectory (at most TRAJECTORY_POINTS), forgetting events, correct when last
    seen in training, correct at the last eval, influence]; None where unknown."""
    return [[run_index[run_id], example_id, prompt, exposures, first, trajectory, forgetting, last_seen, last_eval,
             _finite(influence)]
            for run_id, example_id, prompt, exposures, first, trajectory, forgetting, last_seen, last_eval, influence
            in db.sql(PER_EXAMPLE).fetchall() if run_id in run_index]  # rows of another run id: not this report's


def step_batches(db, run_ids: list[str], rows: list[list]) -> Script:
    """A JavaScript list with one entry per run (in `run_ids` order; null for an untracked run): {offset: the run's
    first row in `rows` (the examples table, which lists each run's examples in id order, as STEP_BATCHES indexes
    them), steps: [...], ids: [[member...]...], loss: [[...]...]}."""
    offsets = {}
    for number, row in enumerate(rows):
        offsets.setdefault(run_ids[row[0]], number)
    found = {run_id: (steps, ids, losses) for run_id, steps, ids, losses in db.sql(STEP_BATCHES).fetchall()}
    parts = [f'{{"offset":{offsets[r]},"steps":{found[r][0]},"ids":[{found[r][1]}],"loss":[{found[r][2]}]}}'
             if r in found and r in offsets else "null" for r in run_ids]
    return Script("[" + ",".join(parts) + "]")


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
