"""`loratrace report RUN... -o report.html`: one self-contained HTML file about one or more runs, from the views.

    loratrace.write_report(["runs/a", "runs/b"], "report.html")

plotly.js is inlined once (the file opens offline; it links to nothing outside itself); each plot is a `<div
id="plot-...">` drawn by `Plotly.newPlot`. Sections: the runs, their config differences, loss / lr / grad-norm per
step (stage boundary and checkpoints marked, several runs overlaid), eval accuracy per checkpoint, the dataset
cartography map, forgetting events, tracking cost. A section without data (an untracked run, a run never
evaluated) says what is missing and how to get it, instead of a plot.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from loratrace.query.formats import check_output, write_text
from loratrace.query.store import open_runs
from loratrace.report.compare import FORGETTING, config_differences
from loratrace.report.html import COLORS, ReportError, missing, page, plot, plotly_js, section, table
from loratrace.report.sweep import study_trials, sweep_sections, trial_run_dirs
from loratrace.runs.find import as_list, read_run_config, read_run_info, study_folders

CARTOGRAPHY = """WITH per_epoch AS (
    SELECT run_id, example_id, epoch, avg(p_gold) AS p_gold, avg(correct::INT) AS correct FROM samples GROUP BY ALL)
SELECT run_id, example_id, avg(p_gold) AS confidence, coalesce(stddev_pop(p_gold), 0) AS variability,
       avg(correct) AS correctness
FROM per_epoch GROUP BY ALL ORDER BY run_id, example_id"""
CURVES = (("train/loss", "loss"), ("train/lr", "learning rate"), ("train/grad_norm", "grad-norm"))
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
    studies_named = [folder.name for folder in study_folders(studies)] if studies else []
    name = title or (f"sweep {', '.join(studies_named)}" if studies_named else ", ".join(data["run_ids"]))
    write_text(page(name, body, script), str(output), [*read, *as_list(paths or [])])  # with the trials' runs
    return Path(output)


def _gather(db, run_dirs: list[Path]) -> dict:
    """Everything the report draws, as DataFrames, read once through the views."""
    run_ids = [d.name for d in run_dirs]
    runs = db.sql("SELECT run_id, status, steps, examples_seen, checkpoints, last_checkpoint_step FROM runs").df()
    tracked = set(db.sql("SELECT DISTINCT run_id FROM batches").df().run_id)
    return {
        "run_ids": run_ids, "run_dirs": run_dirs, "tracked": [r for r in run_ids if r in tracked],
        "runs": _with_run_json(runs.set_index("run_id").reindex(run_ids).reset_index(), run_dirs),
        "config": config_differences(run_dirs) if len(run_dirs) > 1 else None,
        "stage1": {d.name: _config_value(d, "training", "stage1_steps") for d in run_dirs},
        "metrics": db.sql("SELECT run_id, step, name, value FROM metrics ORDER BY run_id, name, step").df(),
        "checkpoints": db.sql("SELECT run_id, step FROM checkpoints ORDER BY run_id, step").df(),
        "evals": db.sql("""SELECT run_id, checkpoint_step, checkpoint_path = 'final_model' AS final_model, split,
                                  scoring, avg(correct::INT) AS accuracy, count(*) AS examples
                           FROM evals GROUP BY ALL ORDER BY ALL""").df(),
        "cartography": db.sql(CARTOGRAPHY).df(),
        "forgetting": db.sql(FORGETTING).df(),
        "cost": _tracking_cost(run_dirs),
    }


def _with_run_json(runs: pd.DataFrame, run_dirs: list[Path]) -> pd.DataFrame:
    """An untracked run's steps and checkpoints from its run.json (the views count them from tracking data)."""
    for key in ("steps", "checkpoints"):
        recorded = [read_run_info(d).get(key) for d in run_dirs]
        runs[key] = [v if pd.notna(v) else r for v, r in zip(runs[key].astype(object), recorded)]
    return runs


def _config_value(run_dir: Path, part: str, key: str):
    return (read_run_config(run_dir).get(part) or {}).get(key)


def _tracking_cost(run_dirs: list[Path]) -> pd.DataFrame:
    """One row per launch of each run that was tracked: run.json's `tracking_cost`."""
    rows = []
    for run_dir in run_dirs:
        for number, attempt in enumerate(read_run_info(run_dir).get("attempts") or [], start=1):
            cost = attempt.get("tracking_cost")
            if cost:
                rows.append({"run_id": run_dir.name, "launch": number, **cost})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------- sections

def _sections(data: dict) -> list[str]:
    run_ids, tracked = data["run_ids"], data["tracked"]
    untracked = [r for r in run_ids if r not in tracked]
    color = {run_id: COLORS[i % len(COLORS)] for i, run_id in enumerate(run_ids)}
    parts = [section("runs", "Runs", table(data["runs"]))]
    if data["config"] is None:
        parts.append(section("config", "Config differences", missing("one run: nothing to compare its config with")))
    elif data["config"].empty:
        parts.append(section("config", "Config differences", missing("the runs' configs are identical")))
    else:
        parts.append(section("config", "Config differences", table(data["config"])))
    note = missing(f"no tracking data for {', '.join(untracked)} ({UNTRACKED})") if untracked else ""
    if tracked:
        parts.append(section("curves", "Loss, learning rate, grad-norm per step", note + plot("plot-curves",
                                                                                                 _curves(data, color))))
    else:
        parts.append(section("curves", "Loss, learning rate, grad-norm per step", note))
    if data["evals"].empty:
        parts.append(section("evals", "Eval accuracy per checkpoint", missing(
            "no evaluations: run `loratrace eval RUN`, or train with eval.every_checkpoint=true")))
    else:
        parts.append(section("evals", "Eval accuracy per checkpoint", plot("plot-evals", _evals(data, color))))
    carto = "".join(plot(f"plot-cartography-{i}", _cartography(data, run_id)) for i, run_id in enumerate(tracked))
    parts.append(section("cartography", "Dataset cartography (confidence vs variability, coloured by correctness)",
                          note + carto))
    parts.append(section("forgetting", "Forgetting events per example", note + (
        plot("plot-forgetting", _forgetting(data, color)) if tracked else "")))
    if data["cost"].empty:
        parts.append(section("cost", "Tracking cost", missing(f"no tracking cost recorded ({UNTRACKED})")))
    else:
        parts.append(section("cost", "Tracking cost", plot("plot-cost", _cost(data)) + table(data["cost"])))
    return parts


# ---------------------------------------------------------------------------------------------- figures

def _curves(data: dict, color: dict):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    figure = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.06,
                           subplot_titles=[title for _, title in CURVES])
    metrics, marks = data["metrics"], data["checkpoints"]
    for run_id in data["tracked"]:
        mine = metrics[metrics.run_id == run_id]
        for row, (name, _) in enumerate(CURVES, start=1):
            series = mine[mine.name == name]
            figure.add_trace(go.Scatter(x=series.step, y=series.value, mode="lines", name=run_id,
                                        legendgroup=run_id, showlegend=row == 1, line={"color": color[run_id]}),
                             row=row, col=1)
        loss = mine[mine.name == "train/loss"].set_index("step").value
        steps = [s for s in marks[marks.run_id == run_id].step if s in loss.index]
        figure.add_trace(go.Scatter(x=steps, y=[loss[s] for s in steps], mode="markers", name=f"{run_id} checkpoints",
                                    legendgroup=run_id, marker={"symbol": "diamond", "size": 7,
                                                                "color": color[run_id]}), row=1, col=1)
    for stage1 in sorted({data["stage1"][r] for r in data["tracked"] if data["stage1"].get(r)}):
        figure.add_vline(x=stage1 + 0.5, line={"dash": "dash", "color": "#888"}, annotation_text="stage 2 starts")
    figure.update_xaxes(title_text="step", row=3, col=1)
    figure.update_layout(height=760, margin={"t": 40})
    return figure


def _evals(data: dict, color: dict):
    import plotly.graph_objects as go

    figure = go.Figure()
    for (run_id, split, scoring, final), group in data["evals"].groupby(["run_id", "split", "scoring", "final_model"]):
        label = f"{run_id} {split}/{scoring}" + (" final_model" if final else "")
        figure.add_trace(go.Scatter(x=group.checkpoint_step, y=group.accuracy, name=label,
                                    mode="markers" if final else "lines+markers",
                                    marker={"color": color.get(run_id), "symbol": "star" if final else "circle"}))
    figure.update_layout(xaxis_title="checkpoint step", yaxis_title="accuracy", yaxis_range=[0, 1], height=420)
    return figure


def _cartography(data: dict, run_id: str):
    import plotly.graph_objects as go

    points = data["cartography"][data["cartography"].run_id == run_id]
    figure = go.Figure(go.Scatter(
        x=points.variability, y=points.confidence, mode="markers", text=points.example_id, name=run_id,
        marker={"color": points.correctness, "colorscale": "RdYlGn", "cmin": 0, "cmax": 1, "size": 6,
                "colorbar": {"title": {"text": "correctness"}}},
        hovertemplate="%{text}<br>variability %{x:.3f}<br>confidence %{y:.3f}<extra></extra>"))
    figure.update_layout(title=run_id, xaxis_title="variability (std of p(gold) over epochs)",
                         yaxis_title="confidence (mean p(gold))", height=480)
    return figure


def _forgetting(data: dict, color: dict):
    import plotly.graph_objects as go

    figure = go.Figure()
    for run_id in data["tracked"]:
        counts = data["forgetting"][data["forgetting"].run_id == run_id].forgetting_events
        figure.add_trace(go.Histogram(x=counts, name=run_id, marker={"color": color[run_id]}, opacity=0.6,
                                      xbins={"size": 1}))
    figure.update_layout(barmode="overlay", xaxis_title="forgetting events (correct, then wrong at the next training)",
                         yaxis_title="examples", height=420)
    return figure


def _cost(data: dict):
    import plotly.graph_objects as go

    cost = data["cost"]
    labels = [f"{r} #{n}" for r, n in zip(cost.run_id, cost.launch)]
    figure = go.Figure([
        go.Bar(x=labels, y=cost.training_thread_share * 100, name="training thread, % of training time"),
        go.Bar(x=labels, y=cost.background_share * 100, name="writer's thread CPU, % of training time"),
    ])
    figure.update_layout(barmode="group", yaxis_title="% of training wall time", height=380)
    return figure
