"""The report's proof sections (report/runs.py places them): the replays among its runs (`loratrace replay`, each
naming its original, the step it started from and what it dropped) and the validation of attribution (`loratrace
influence RUN --validate`: each method's LDS beside the random baseline's, and each test example's Spearman). Both
read from the views (`runs`' replay columns, `validations`); nothing is computed again.
"""

from __future__ import annotations

import json

import pandas as pd

from loratrace.report.html import missing, section, table

DROPPED_SHOWN = 3  # dropped example ids named per replay; the rest as "+N"
NOT_VALIDATED = ("influence not validated: run `loratrace influence RUN --validate` (replays subsets of the run's "
                 "tail and ranks each method's predictions against the actual loss changes)")
VALIDATIONS = """SELECT run_id, method, project_dim, test_split, test_example_id, subsets, fraction, seed, from_step,
       to_step, spearman, lds, lds_low, lds_high FROM validations
ORDER BY run_id, method, project_dim NULLS LAST, test_split, test_example_id"""
SETUP = ["run_id", "subsets", "fraction", "seed", "from_step", "to_step"]  # one --validate call: a method's baseline


def replay_rows(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs view's rows of the replays (their `replay_of` set), with the columns the section shows."""
    if "replay_of_run" not in runs.columns:
        return pd.DataFrame()
    return runs[runs.replay_of_run.notna()].reset_index(drop=True)


def dropped_text(dropped: str | None) -> str:
    """runs' `replay_dropped_ids` (a JSON list) as its first DROPPED_SHOWN ids and "+N" for the rest; "none" when
    empty."""
    ids = json.loads(dropped) if dropped else []
    shown = ", ".join(ids[:DROPPED_SHOWN])
    return (shown + (f" +{len(ids) - DROPPED_SHOWN}" if len(ids) > DROPPED_SHOWN else "")) if ids else "none"


def replays_section(replays: pd.DataFrame, final_loss: dict, labels: dict) -> str | None:
    """One row per replay: its original, the step it started from and ended at, the dropped examples, its final loss
    and the original's (when the original is in the report too). None without replays: the section is left out."""
    if replays.empty:
        return None

    def loss(value) -> float | None:
        return None if value is None or pd.isna(value) else float(value)

    rows = pd.DataFrame({
        "replay": [labels.get(r, r) for r in replays.run_id],
        "original": [labels.get(o, o) for o in replays.replay_of_run],
        "from step": replays.replay_of_step, "to step": replays.replay_end_step,
        "dropped": [dropped_text(d) for d in replays.replay_dropped_ids],
        "final loss": [loss(v) for v in replays.final_loss],
        "original's final loss": [loss(final_loss.get(o)) for o in replays.replay_of_run],
        "run_id": replays.run_id})
    note = ('<p class="note">Runs written by `loratrace replay`: the original\'s recorded batches from a checkpoint '
            "on, less the dropped examples; the original's final loss is shown when it is in this report too.</p>")
    return section("replays", "Replays", note + table(rows))


def validation_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, method, project_dim) of the `validations` view: its LDS and 95% interval, and the random
    baseline's LDS from the same --validate call beside it."""
    keys = [*SETUP, "method", "project_dim"]
    per_call = frame.drop_duplicates(keys)[[*keys, "test_split", "lds", "lds_low", "lds_high"]]
    per_call = per_call.assign(tests=frame.groupby(keys, dropna=False).test_example_id.transform("count")
                               .loc[per_call.index])
    baseline = per_call[per_call.method == "random"][[*SETUP, "lds"]].rename(columns={"lds": "random_lds"})
    methods = per_call[per_call.method != "random"].merge(baseline, on=SETUP, how="left")
    return methods.reset_index(drop=True)


def validations_section(frame: pd.DataFrame, labels: dict) -> str | None:
    """The LDS per (run, method, project_dim) with the random baseline's, then each test example's Spearman (one
    column per method). None when the view is empty: the section is left out (the influence section says how)."""
    if frame.empty:
        return None
    summary = validation_summary(frame)
    shown = pd.DataFrame({
        "run": [labels.get(r, r) for r in summary.run_id], "method": summary.method,
        "project_dim": [("exact" if pd.isna(d) else str(int(d))) for d in summary.project_dim],
        "LDS": summary.lds,
        "95% interval": [f"[{lo:.4f}, {hi:.4f}]" for lo, hi in zip(summary.lds_low, summary.lds_high)],
        "random LDS": summary.random_lds, "test examples": summary.tests, "subsets": summary.subsets,
        "fraction": summary.fraction, "steps": [f"{a}-{b}" for a, b in zip(summary.from_step, summary.to_step)]})
    note = ('<p class="note">From `loratrace influence RUN --validate`: subsets of the run\'s tail were dropped and '
            "replayed; LDS is the mean over the test examples of the Spearman correlation between a method's predicted "
            "and the actual loss changes (95% bootstrap interval), beside random scores' LDS on the same subsets.</p>")
    return section("validations", "Validation of attribution (linear datamodeling score)",
                   note + table(shown) + "<h3>Spearman per test example</h3>" + _spearman_table(frame, labels))


def _spearman_table(frame: pd.DataFrame, labels: dict) -> str:
    """Test examples as rows, one column per run, method and projection: each test example's Spearman."""
    column = [f"{labels.get(r, r)} {m}" + ("" if pd.isna(d) else f" d={int(d)}")
              for r, m, d in zip(frame.run_id, frame.method, frame.project_dim)]
    wide = (frame.assign(column=column)
            .pivot_table(index=["test_split", "test_example_id"], columns="column", values="spearman",
                         aggfunc="first", sort=False).reset_index())
    wide.columns.name = None
    return f'<div class="tall">{table(wide)}</div>'


def not_validated_note() -> str:
    return missing(NOT_VALIDATED)

