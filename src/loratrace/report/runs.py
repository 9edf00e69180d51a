"""`loratrace report RUN... -o report.html`: one self-contained HTML file about one or more runs, from the views.

    loratrace.write_report(["runs/a", "runs/b"], "report.html")

plotly.js and the report's own script (report/script.py) are inlined once (the file opens offline; it links to
nothing outside itself); each plot is a `<div id="plot-...">` drawn by `Plotly.newPlot` (the curves by `LT.curves`).
Sections, under a table of contents: the runs, the replays among them (when any), their config differences, loss /
lr / grad-norm per step (stage boundary and checkpoints marked, several runs overlaid, each step's batch in the hover
and on click), eval accuracy +/- stderr per checkpoint, the examples table, influence and its validation (when
computed), the dataset cartography map, forgetting events, tracking cost. A section without data (an untracked run, a
run never evaluated) says what is missing and how to get it, instead of a plot. What is gathered per example and per
step: report/examples.py; the interactive sections: report/sections.py; replays and validation: report/proofs.py; the
figures: report/figures.py.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from loratrace.query.formats import check_output, write_text
from loratrace.query.store import open_runs
from loratrace.report import examples, figures, proofs, sections
from loratrace.report.compare import config_differences
from loratrace.report.html import COLORS, ReportError, missing, page, plot, plotly_js, section, table
from loratrace.report.sweep import study_trials, sweep_sections, trial_run_dirs
from loratrace.runs.find import as_list, read_run_config, read_run_info, study_folders

CARTOGRAPHY = """WITH per_epoch AS (
    SELECT run_id, example_id, epoch, avg(p_gold) AS p_gold, avg(correct::INT) AS correct FROM samples GROUP BY ALL)
SELECT run_id, example_id, avg(p_gold) AS confidence, coalesce(stddev_pop(p_gold), 0) AS variability,
       avg(correct) AS correctness
FROM per_epoch GROUP BY ALL ORDER BY run_id, example_id"""
UNTRACKED = "trained without --track-batches"


def write_report(paths, output: str | Path = "report.html", title: str | None = None, studies=None) -> Path:
    """Write the report on the runs named by `paths` (as `open_runs` takes them) to `output`; returns its path.
    `studies`: sweep study folders (runs/sweeps/<study>): their trials first (report_sweep.py), then their runs."""
    script = plotly_js()  # a missing plotly says so before any work
    read = [*as_list(paths or []), *study_folders(studies or [])]  # what `output` must stay out of
    check_output(output, read)  # before any work
    sweep = []
    if studies:
        if not study_folders(studies):
            raise ReportError(f"no sweep study in {', '.join(map(str, as_list(studies)))} (a folder with sweep.json)")
        trials = study_trials(studies)
        sweep = sweep_sections(trials)
        paths = [*as_list(paths or []), *trial_run_dirs(trials)]
    if sweep and not paths:  # a study whose trials have no run folder yet: its sections say so
        data = None
    else:
        with open_runs(paths) as db:
            run_dirs = list(db.run_dirs)
            if not run_dirs:
                raise ReportError(f"no runs in {paths}")
            data = _gather(db, run_dirs)
    body = "\n".join(sweep + (_sections(data) if data is not None else []))
    script_data = {} if data is None else {
        "pageSize": sections.PAGE_ROWS, "runs": [{"run_id": r, "label": data["labels"][r]} for r in data["run_ids"]],
        "examples": {"rows": data["examples"]}, "batches": data["batches"]}
    studies_named = [folder.name for folder in study_folders(studies)] if studies else []
    name = title or (f"sweep {', '.join(studies_named)}" if studies_named else ", ".join(data["run_ids"]))
    # `output` is checked again against the trials' runs too
    write_text(page(name, body, script, script_data), str(output), [*read, *as_list(paths or [])])
    return Path(output)


def _gather(db, run_dirs: list[Path]) -> dict:
    """Everything the report draws, as DataFrames, read once through the views."""
    ids = dict(db.sql("SELECT dir, run_id FROM runs").fetchall())  # run.json's run_id, which the views hold
    run_ids = [ids.get(str(d), d.name) for d in run_dirs]
    labels = sections.run_labels(run_dirs, run_ids)
    runs = db.sql("SELECT run_id, status, steps, examples_seen, checkpoints, last_checkpoint_step FROM runs").df()
    runs = _with_run_json(runs.set_index("run_id").reindex(run_ids).reset_index(), run_dirs)
    runs.insert(1, "label", [labels[r] for r in runs.run_id])
    tracked = set(db.sql("SELECT DISTINCT run_id FROM batches").df().run_id)
    config = config_differences(run_dirs) if len(run_dirs) > 1 else None
    every = db.sql("SELECT * FROM runs").df()  # the replays' columns, and the final loss of each run
    rows = examples.example_rows(db, {r: i for i, r in enumerate(run_ids)})
    return {
        "run_ids": run_ids, "run_dirs": run_dirs, "tracked": [r for r in run_ids if r in tracked], "labels": labels,
        "runs": runs,
        "config": None if config is None else config.rename(columns={d.name: labels[r] for d, r in zip(run_dirs,
                                                                                                      run_ids)}),
        "stage1": {r: _config_value(d, "training", "stage1_steps") for d, r in zip(run_dirs, run_ids)},
        "metrics": db.sql("SELECT run_id, step, name, value FROM metrics ORDER BY run_id, name, step").df(),
        "checkpoints": db.sql("SELECT run_id, step FROM checkpoints ORDER BY run_id, step").df(),
        "evals": examples.eval_accuracy(db),
        "examples": rows, "batches": examples.step_batches(db, run_ids, rows),
        "influence": examples.influence_totals(db),
        "cartography": db.sql(CARTOGRAPHY).df(),
        "cost": _tracking_cost(run_dirs, run_ids),
        "replays": proofs.replay_rows(every.set_index("run_id").reindex(run_ids).reset_index()),
        "final_loss": dict(zip(every.run_id, every.final_loss)),
        "validations": db.sql(proofs.VALIDATIONS).df(),
    }


def _with_run_json(runs: pd.DataFrame, run_dirs: list[Path]) -> pd.DataFrame:
    """An untracked run's steps and checkpoints from its run.json (the views count them from tracking data)."""
    for key in ("steps", "checkpoints"):
        recorded = [read_run_info(d).get(key) for d in run_dirs]
        runs[key] = [v if pd.notna(v) else r for v, r in zip(runs[key].astype(object), recorded)]
    return runs


def _config_value(run_dir: Path, part: str, key: str):
    return (read_run_config(run_dir).get(part) or {}).get(key)


def _tracking_cost(run_dirs: list[Path], run_ids: list[str]) -> pd.DataFrame:
    """One row per launch of each run that was tracked: run.json's `tracking_cost`."""
    rows = []
    for run_dir, run_id in zip(run_dirs, run_ids):
        for number, attempt in enumerate(read_run_info(run_dir).get("attempts") or [], start=1):
            cost = attempt.get("tracking_cost")
            if cost:
                rows.append({"run_id": run_id, "launch": number, **cost})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------- sections

def _sections(data: dict) -> list[str]:
    run_ids, tracked = data["run_ids"], data["tracked"]
    untracked = [r for r in run_ids if r not in tracked]
    color = {run_id: COLORS[i % len(COLORS)] for i, run_id in enumerate(run_ids)}
    parts = [section("runs", "Runs", table(data["runs"]))]
    parts += [replays] if (replays := proofs.replays_section(data["replays"], data["final_loss"],
                                                             data["labels"])) else []
    if data["config"] is None:
        parts.append(section("config", "Config differences", missing("one run: nothing to compare its config with")))
    elif data["config"].empty:
        parts.append(section("config", "Config differences", missing("the runs' configs are identical")))
    else:
        parts.append(section("config", "Config differences", table(data["config"])))
    note = missing(f"no tracking data for {', '.join(untracked)} ({UNTRACKED})") if untracked else ""
    parts += [sections.curves_section(data, color, note), sections.evals_section(data, color),
              sections.examples_section(data)]
    validations = proofs.validations_section(data["validations"], data["labels"])
    parts += [influence] if (influence := sections.influence_section(
        data, "" if validations else proofs.not_validated_note())) else []
    parts += [validations] if validations else []
    carto = "".join(plot(f"plot-cartography-{i}", figures.cartography(data, run_id))
                    for i, run_id in enumerate(tracked))
    parts.append(section("cartography", "Dataset cartography (confidence vs variability, coloured by correctness)",
                         note + carto))
    parts.append(section("forgetting", "Forgetting events per example", note + (
        plot("plot-forgetting", figures.forgetting(data, color)) if tracked else "")))
    if data["cost"].empty:
        parts.append(section("cost", "Tracking cost", missing(f"no tracking cost recorded ({UNTRACKED})")))
    else:
        parts.append(section("cost", "Tracking cost", plot("plot-cost", figures.cost(data)) + table(data["cost"])))
    return parts
