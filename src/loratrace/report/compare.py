"""Runs side by side, down to single examples, from the query views (`loratrace compare`, `loratrace.compare`).

    c = loratrace.compare(["runs/arc-challenge_lora_A", "runs/arc-challenge_lora_B"])
    c.config            # the config keys that differ, one column per run
    c.data_order        # per run against the first: same examples in the same order? the first step that differs
                        # (and, where one run is a replay of the other, exactly the examples it left out)
    c.examples          # examples correct at the last evaluated checkpoint in one run and wrong in the other

The first run is the reference every other run is set against. Every table is a pandas DataFrame.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from loratrace.config import flatten_keys
from loratrace.errors import LoratraceError
from loratrace.query.store import open_runs
from loratrace.report import SECTIONS
from loratrace.runs.find import differing_keys, read_run_config, read_run_info

METRICS = ("train/loss", "train/grad_norm", "train/lr", "train/accuracy")

# Per run and step: the example ids trained, in the order the step met them (micro-batch, rank, position).
STEP_ORDER = """SELECT run_id, step, flatten(list(example_ids ORDER BY micro_batch, rank)) AS ids
                FROM batches GROUP BY run_id, step"""

# Per run and example: times it went from correct to wrong between two consecutive trainings on it.
FORGETTING = """WITH seq AS (
    SELECT run_id, example_id, correct,
           lag(correct) OVER (PARTITION BY run_id, example_id ORDER BY step, micro_batch, rank, position) AS before
    FROM samples)
SELECT run_id, example_id, count(*) FILTER (WHERE before AND NOT correct) AS forgetting_events
FROM seq GROUP BY ALL"""

# Per run, split and scoring: the correctness of every example at the last checkpoint evaluated (final_model aside).
LAST_EVALUATED = """WITH last AS (
    SELECT run_id, split, scoring, max(checkpoint_step) AS checkpoint_step FROM evals
    WHERE checkpoint_path <> 'final_model' GROUP BY ALL)
SELECT e.run_id, e.split, e.scoring, e.checkpoint_step, e.example_id, e.line, e.correct
FROM evals e JOIN last USING (run_id, split, scoring, checkpoint_step) WHERE e.checkpoint_path <> 'final_model'"""


# Per run: the runs view's facts with the final and best of its metrics. last_eval_*: the latest checkpoint evaluated
# (final_model aside; of several splits or scorings, the first by name), best_eval_*: the runs view's.
RUN_FACTS = """WITH loss AS (SELECT run_id, min(value) AS lowest_loss, arg_min(step, value) AS lowest_loss_step
                             FROM metrics WHERE name = 'train/loss' GROUP BY run_id),
     accuracy AS (SELECT run_id, arg_max(value, step) AS final_train_accuracy
                  FROM metrics WHERE name = 'train/accuracy' GROUP BY run_id),
     last AS (SELECT run_id, accuracy AS last_eval_accuracy, stderr AS last_eval_stderr,
                     checkpoint_step AS last_eval_step FROM eval_accuracy WHERE checkpoint_path <> 'final_model'
              QUALIFY row_number() OVER (PARTITION BY run_id ORDER BY checkpoint_step DESC, split, scoring) = 1)
SELECT run_id, name, status, steps, examples_seen, checkpoints, last_checkpoint_step, duration_s, final_loss,
       lowest_loss, lowest_loss_step, final_train_accuracy, best_eval_accuracy, best_eval_stderr, best_eval_step,
       best_eval_split, last_eval_accuracy, last_eval_stderr, last_eval_step, dir
FROM runs LEFT JOIN loss USING (run_id) LEFT JOIN accuracy USING (run_id) LEFT JOIN last USING (run_id)"""


class CompareError(LoratraceError):
    """Runs that cannot be compared (fewer than two)."""

    exit_code = 1


@dataclass
class Comparison:
    """The tables of a comparison; `run_ids[0]` is the reference."""

    run_ids: list[str]
    runs: pd.DataFrame
    config: pd.DataFrame
    metrics: pd.DataFrame
    evals: pd.DataFrame
    data_order: pd.DataFrame
    examples: pd.DataFrame
    forgetting: pd.DataFrame

    def sections(self) -> dict[str, pd.DataFrame]:
        return {name: getattr(self, name) for name in SECTIONS}


def compare(paths, top: int = 20) -> Comparison:
    """Compare the runs named by `paths` (run folders, folders of runs or globs, as `open_runs` takes them), the first
    as reference. `top`: how many examples per run to keep in `forgetting` (the largest differences)."""
    with open_runs(paths) as db:
        run_dirs = list(db.run_dirs)
        if len(run_dirs) < 2:
            raise CompareError(f"compare needs at least two runs; found {len(run_dirs)} in {paths}")
        run_ids = [d.name for d in run_dirs]
        if len(set(run_ids)) < len(run_ids):
            raise CompareError("two of the runs share a folder name; compare runs with distinct names")
        runs = db.sql(RUN_FACTS).df().set_index("run_id").reindex(run_ids).reset_index()
        metrics = _metrics(db.sql("SELECT run_id, step, name, value FROM metrics").df(), run_ids)
        evals = _evals(db.sql("""SELECT run_id, checkpoint_step, checkpoint_path, split, scoring, accuracy, stderr
                                 FROM eval_accuracy""").df(), run_ids)
        replays = {d.name: read_run_info(d).get("replay_of") or {} for d in run_dirs}
        order = _data_order(db.sql(STEP_ORDER).df(), run_ids, replays)
        examples = _example_flips(db.sql(LAST_EVALUATED).df(), run_ids)
        forgetting = _forgetting(db.sql(FORGETTING).df(), run_ids, top)
    return Comparison(run_ids, runs, config_differences(run_dirs), metrics, evals, order, examples, forgetting)


def config_differences(run_dirs: list[Path]) -> pd.DataFrame:
    """The dotted config keys whose values differ between the runs' config.yaml (find.differing_keys: the run's name,
    tags and runs_dir left out): key, then one column per run with the value as JSON text (null: absent there)."""
    configs = [read_run_config(Path(run_dir)) for run_dir in run_dirs]
    flat = [flatten_keys(config) for config in configs]
    rows = [[key, *(json.dumps(config[key]) if key in config else None for config in flat)]
            for key in differing_keys(configs)]
    return pd.DataFrame(rows, columns=["key", *[Path(d).name for d in run_dirs]], dtype=object)


def _metrics(frame: pd.DataFrame, run_ids: list[str]) -> pd.DataFrame:
    """step, name, then each run's value at that step (NaN: that run has no value there)."""
    columns = ["step", "name", *run_ids]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    wide = frame.pivot_table(index=["step", "name"], columns="run_id", values="value", aggfunc="first")
    wide = wide.reindex(columns=run_ids).reset_index()
    wide["name"] = pd.Categorical(wide["name"], categories=METRICS, ordered=True)
    wide = wide.sort_values(["name", "step"]).reset_index(drop=True)
    wide["name"] = wide["name"].astype(str)
    wide.columns.name = None
    return wide[columns]


def _evals(frame: pd.DataFrame, run_ids: list[str]) -> pd.DataFrame:
    """checkpoint_step, what was scored (a checkpoint or final_model), split, scoring, each run's accuracy, then each
    run's standard error (`<run_id> stderr`, query/accuracy.py)."""
    errors = [f"{run_id} stderr" for run_id in run_ids]
    columns = ["checkpoint_step", "scored", "split", "scoring", *run_ids, *errors]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    frame = frame.assign(scored=frame.checkpoint_path.where(frame.checkpoint_path == "final_model", "checkpoint"))
    index = ["checkpoint_step", "scored", "split", "scoring"]
    wide = frame.pivot_table(index=index, columns="run_id", values="accuracy", aggfunc="first").reindex(columns=run_ids)
    error = frame.pivot_table(index=index, columns="run_id", values="stderr", aggfunc="first", dropna=False) \
        .reindex(index=wide.index, columns=run_ids)
    error.columns = errors
    wide = wide.join(error).reset_index()
    wide.columns.name = None
    return wide.sort_values(["split", "scoring", "checkpoint_step", "scored"]).reset_index(drop=True)[columns]


def _data_order(frame: pd.DataFrame, run_ids: list[str], replays: dict[str, dict]) -> pd.DataFrame:
    """For each run against the reference: steps both trained, whether every one of them met the same examples in
    the same order, the first step where they differ, whether the two saw the same set of examples at all, and where
    one is a replay of the other (run.json's `replay_of`, proof/replay.py) the examples it left out."""
    by_run = {run_id: dict(zip(group.step, group.ids)) for run_id, group in frame.groupby("run_id")}
    reference = run_ids[0]
    mine = by_run.get(reference, {})
    rows = []
    for run_id in run_ids[1:]:
        theirs = by_run.get(run_id, {})
        steps = sorted(set(mine) | set(theirs))
        both = [s for s in steps if s in mine and s in theirs]
        first = next((s for s in steps if s not in mine or s not in theirs or list(mine[s]) != list(theirs[s])), None)
        seen = [{e for ids in run.values() for e in ids} for run in (mine, theirs)]
        tracked = bool(mine) and bool(theirs)
        removed, note = _removed(by_run, reference, run_id, replays) if tracked else (None, "")
        rows.append({"reference": reference, "run_id": run_id, "steps_compared": len(both),
                     "same_order": (first is None) if tracked else None,
                     "first_divergent_step": first if tracked else None,
                     "same_examples": (seen[0] == seen[1]) if tracked else None,
                     "replay": _replay_direction(reference, run_id, replays),
                     "replay_step": _replay_of(reference, run_id, replays).get("step"),
                     "removed_examples": removed,
                     "note": note if tracked else "no tracking data in one of the runs (train with --track-batches)"})
    return pd.DataFrame(rows, columns=["reference", "run_id", "steps_compared", "same_order", "first_divergent_step",
                                       "same_examples", "replay", "replay_step", "removed_examples", "note"]) \
        .astype({"first_divergent_step": "Int64", "replay_step": "Int64"})


def _replay_of(reference: str, run_id: str, replays: dict[str, dict]) -> dict:
    """The `replay_of` record linking the two runs (either way round), or {}."""
    for replay, original in ((run_id, reference), (reference, run_id)):
        if replays.get(replay, {}).get("run") == original:
            return replays[replay]
    return {}


def _replay_direction(reference: str, run_id: str, replays: dict[str, dict]) -> str | None:
    if replays.get(run_id, {}).get("run") == reference:
        return "run is a replay of the reference"
    if replays.get(reference, {}).get("run") == run_id:
        return "reference is a replay of run"
    return None


def _removed(by_run: dict, reference: str, run_id: str, replays: dict[str, dict]) -> tuple[list | None, str]:
    """The examples the original trained after the replay's checkpoint step (up to the replay's last step) that the
    replay never met, sorted; with a note when they are not exactly the replay's recorded `dropped`."""
    record = _replay_of(reference, run_id, replays)
    if not record:
        return None, ""
    replay = run_id if replays.get(run_id) is record else reference
    original = reference if replay == run_id else run_id
    start, tail = record.get("step") or 0, by_run[replay]
    end = max(tail, default=start)
    met = {e for step, ids in by_run[original].items() if start < step <= end for e in ids}
    removed = sorted(met - {e for step, ids in tail.items() if step > start for e in ids})
    dropped = sorted(map(str, record.get("dropped") or []))
    note = "" if removed == dropped else f"run.json's replay_of.dropped names {len(dropped)} example(s), the " \
                                         f"record shows {len(removed)} removed"
    return removed, note


def _example_flips(frame: pd.DataFrame, run_ids: list[str]) -> pd.DataFrame:
    """Examples correct at the last evaluated checkpoint of the reference and wrong at the other run's, or the
    reverse (same split and scoring)."""
    columns = ["reference", "run_id", "split", "scoring", "example_id", "line", "reference_step", "run_step",
               "reference_correct", "run_correct"]
    reference = run_ids[0]
    mine = frame[frame.run_id == reference]
    parts = []
    for run_id in run_ids[1:]:
        joined = mine.merge(frame[frame.run_id == run_id], on=["split", "scoring", "example_id", "line"],
                            suffixes=("_ref", "_run"))
        flips = joined[joined.correct_ref != joined.correct_run]
        parts.append(pd.DataFrame({
            "reference": reference, "run_id": run_id, "split": flips.split, "scoring": flips.scoring,
            "example_id": flips.example_id, "line": flips.line, "reference_step": flips.checkpoint_step_ref,
            "run_step": flips.checkpoint_step_run, "reference_correct": flips.correct_ref,
            "run_correct": flips.correct_run}))
    result = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)
    return result[columns].sort_values(["run_id", "split", "scoring", "line"]).reset_index(drop=True)


def _forgetting(frame: pd.DataFrame, run_ids: list[str], top: int) -> pd.DataFrame:
    """Examples whose forgetting-event counts differ most between the reference and each run (an example one run
    never trained on counts 0 there), the `top` largest differences per run; equal counts are not listed."""
    columns = ["reference", "run_id", "example_id", "reference_events", "run_events", "difference"]
    counts = frame.pivot_table(index="example_id", columns="run_id", values="forgetting_events", aggfunc="sum",
                               fill_value=0) if not frame.empty else pd.DataFrame()
    reference = run_ids[0]
    parts = []
    for run_id in run_ids[1:]:
        if reference not in counts or run_id not in counts:
            continue
        pair = pd.DataFrame({"reference": reference, "run_id": run_id, "example_id": counts.index,
                             "reference_events": counts[reference].to_numpy(), "run_events": counts[run_id].to_numpy()})
        pair["difference"] = pair.run_events - pair.reference_events
        pair = pair[pair.difference != 0]
        order = pair.difference.abs().sort_values(ascending=False, kind="stable").index
        parts.append(pair.loc[order].head(top))
    result = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)
    return result[columns].reset_index(drop=True)
