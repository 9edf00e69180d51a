"""The sweep sections of `loratrace report --study runs/sweeps/<study> -o sweep.html`: the trials (state, objective,
params, run), the objective per trial with the best so far, each trial's intermediate values (pruned ones dashed),
and each parameter against the objective. The trials' runs follow as in any report.

    write_report([], "sweep.html", studies=["runs/sweeps/my-study"])
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from loratrace.errors import first_line
from loratrace.report.html import missing, plot, section, table
from loratrace.runs.find import DamagedRun, study_folders
from loratrace.track import schema

STATE_COLORS = {"complete": "#1f77b4", "pruned": "#ff7f0e", "fail": "#d62728", "running": "#7f7f7f",
                "waiting": "#bcbd22"}


def study_trials(studies) -> pd.DataFrame:
    """Every trial of the named study folders (their trials.parquet), params flattened to dotted keys."""
    frames = [_read_trials(folder / schema.TRIALS_FILE) for folder in study_folders(studies)
              if (folder / schema.TRIALS_FILE).exists()]
    if not frames:
        return pd.DataFrame(columns=[f.name for f in schema.TRIALS])
    return pd.concat(frames, ignore_index=True)


def _read_trials(path: Path) -> pd.DataFrame:
    """A study's trials.parquet, its params parsed; one that cannot be read as the sweep writes it is one line naming
    it (the report was asked for this study: it cannot answer without it)."""
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as exc:
        raise DamagedRun(f"{path}: cannot be read ({first_line(exc)})") from None
    problem = schema.part_problem(table.schema, schema.TRIALS)
    if problem:
        raise DamagedRun(f"{path}: {problem}")
    trials = table.to_pandas()
    try:
        params = [json.loads(text) for text in trials.params]
    except (TypeError, ValueError) as exc:
        raise DamagedRun(f"{path}: a trial's params are not JSON ({first_line(exc)})") from None
    if not all(isinstance(tree, dict) for tree in params):
        raise DamagedRun(f"{path}: a trial's params are not a JSON object")
    trials["params"] = [_flat(tree) for tree in params]
    return trials


def trial_run_dirs(trials: pd.DataFrame) -> list[Path]:
    """The trials' run folders that exist, each once (a continued trial shares its run)."""
    return [Path(d) for d in dict.fromkeys(trials.run_dir.dropna()) if (Path(d) / "run.json").exists()]


def sweep_sections(trials: pd.DataFrame) -> list[str]:
    if trials.empty:
        return [section("sweep", "Sweep", missing("no trials yet: run loratrace sweep"))]
    parts = []
    for (study, name, direction), group in trials.groupby(["study", "objective_name", "direction"], sort=False):
        key = f"sweep-{len(parts)}"
        shown = group.assign(params=[" ".join(f"{k}={v}" for k, v in p.items()) for p in group.params])
        trial_table = table(shown[["trial", "state", "objective", "params", "run_id", "retry_of"]])
        best = _best(group, direction)
        summary = (f"<p>best: trial {int(best.trial)}, {name} {best.objective:.6g}, run {best.run_id}</p>"
                   if best is not None else missing("no trial completed yet"))
        parts.append(section(key, f"Sweep {study}: {name} ({direction})", summary + trial_table
                              + plot(f"plot-{key}-objective", _objective(group, name, direction))
                              + plot(f"plot-{key}-intermediate", _intermediate(group, name))
                              + plot(f"plot-{key}-params", _params(group, name))))
    return parts


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def _best(group: pd.DataFrame, direction: str):
    complete = group[group.state == "complete"]
    if complete.empty:
        return None
    return complete.loc[complete.objective.idxmax() if direction == "maximize" else complete.objective.idxmin()]


def _objective(group: pd.DataFrame, name: str, direction: str):
    import plotly.graph_objects as go

    figure = go.Figure()
    for state, rows in group.groupby("state"):
        figure.add_trace(go.Scatter(x=rows.trial, y=rows.objective, mode="markers", name=state,
                                    marker={"color": STATE_COLORS.get(state), "size": 9}, text=rows.run_id))
    complete = group[group.state == "complete"].sort_values("trial")
    best = complete.objective.cummax() if direction == "maximize" else complete.objective.cummin()
    figure.add_trace(go.Scatter(x=complete.trial, y=best, mode="lines", line={"shape": "hv", "color": "#2ca02c"},
                                name="best so far"))
    figure.update_layout(xaxis_title="trial", yaxis_title=name, height=380, title="objective per trial")
    return figure


def _intermediate(group: pd.DataFrame, name: str):
    import plotly.graph_objects as go

    figure = go.Figure()
    for row in group.itertuples(index=False):
        values = list(row.intermediate_values) if row.intermediate_values is not None else []
        figure.add_trace(go.Scatter(x=[v["step"] for v in values], y=[v["value"] for v in values], mode="lines+markers",
                                    name=f"trial {row.trial} ({row.state})",
                                    line={"color": STATE_COLORS.get(row.state),
                                          "dash": "dash" if row.state == "pruned" else "solid"}))
    figure.update_layout(xaxis_title="checkpoint step", yaxis_title=name, height=420,
                         title="intermediate values (what the pruner saw)")
    return figure


def _params(group: pd.DataFrame, name: str):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    keys = list(dict.fromkeys(k for p in group.params for k in p))
    figure = make_subplots(rows=1, cols=max(len(keys), 1), subplot_titles=keys, shared_yaxes=True)
    finished = group[group.state.isin(["complete", "pruned"])]
    for col, key in enumerate(keys, start=1):
        for state, rows in finished.groupby("state"):
            figure.add_trace(go.Scatter(x=[str(p.get(key)) if isinstance(p.get(key), str) else p.get(key)
                                           for p in rows.params], y=rows.objective, mode="markers", name=state,
                                        showlegend=col == 1, marker={"color": STATE_COLORS.get(state), "size": 9}),
                             row=1, col=col)
        values = [p.get(key) for p in finished.params]
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if numbers and len(numbers) == len(values) and min(numbers) > 0 and max(numbers) / min(numbers) >= 100:
            figure.update_xaxes(type="log", row=1, col=col)  # a learning rate's range spans decades
    figure.update_yaxes(title_text=name, row=1, col=1)
    figure.update_layout(height=380, title="parameters against the objective")
    return figure
