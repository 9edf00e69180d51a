"""The report's plotly figures, from what report/runs.py gathered (`data`): curves per step, eval accuracy with its
standard error, dataset cartography, forgetting, tracking cost, influence. A run is named by its short label
(`data["labels"]`); its full id shows in the hover.

plotly is the `report` extra: without it this module still imports, and html.plotly_js() says what to install (one
line) before any figure is drawn.
"""

from __future__ import annotations

try:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots
except ImportError:  # said by html.plotly_js()
    go = make_subplots = None

CURVES = (("train/loss", "loss"), ("train/lr", "learning rate"), ("train/grad_norm", "grad-norm"))
WITH_BATCH = ("train/loss", "train/grad_norm")  # curves whose hover lists the step's batch (LT.curves)


def curves(data: dict, color: dict):
    figure = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.06,
                           subplot_titles=[title for _, title in CURVES])
    metrics, marks, labels = data["metrics"], data["checkpoints"], data["labels"]
    for run_id in data["tracked"]:
        mine, label, run = metrics[metrics.run_id == run_id], labels[run_id], data["run_ids"].index(run_id)
        for row, (name, title) in enumerate(CURVES, start=1):
            series = mine[mine.name == name]
            batch = "<br>%{text}" if name in WITH_BATCH else ""
            figure.add_trace(go.Scatter(
                x=series.step.to_numpy(), y=series.value.to_numpy(), mode="lines",  # customdata: the raw y (LT.curves)
                name=label, legendgroup=run_id, showlegend=row == 1, line={"color": color[run_id]},
                meta={"run": run, "smooth": True, **({"batch": True} if batch else {})},
                hovertemplate=(f"<b>{label}</b> step %{{x}}<br>{title} %{{customdata:.5g}}{batch}"
                               f"<extra>{run_id}</extra>")),
                row=row, col=1)
        loss = mine[mine.name == "train/loss"].set_index("step").value
        steps = [s for s in marks[marks.run_id == run_id].step if s in loss.index]
        figure.add_trace(go.Scatter(x=steps, y=[loss[s] for s in steps], mode="markers", name=f"{label} checkpoints",
                                    legendgroup=run_id, marker={"symbol": "diamond", "size": 7, "color": color[run_id]},
                                    hovertemplate=f"{label} checkpoint at step %{{x}}<extra>{run_id}</extra>"),
                         row=1, col=1)
    for stage1 in sorted({data["stage1"][r] for r in data["tracked"] if data["stage1"].get(r)}):
        figure.add_vline(x=stage1 + 0.5, line={"dash": "dash", "color": "#888"}, annotation_text="stage 2 starts")
    figure.update_xaxes(title_text="step", row=3, col=1)
    figure.update_layout(height=760, margin={"t": 40}, hovermode="closest")
    return figure


def evals(data: dict, color: dict):
    figure = go.Figure()
    for (run_id, split, scoring, final), group in data["evals"].groupby(["run_id", "split", "scoring", "final_model"]):
        label = f"{data['labels'][run_id]} {split}/{scoring}" + (" final_model" if final else "")
        figure.add_trace(go.Scatter(
            x=group.checkpoint_step.to_numpy(), y=group.accuracy.to_numpy(), name=label,
            mode="markers" if final else "lines+markers",
            error_y={"type": "data", "array": group.stderr.fillna(0).to_numpy(), "visible": True},
            customdata=[[int(n), s] for n, s in zip(group.examples, group.stderr.fillna(0))],
            hovertemplate=(f"<b>{label}</b> checkpoint %{{x}}<br>accuracy %{{y:.4f}} +/- %{{customdata[1]:.4f}}"
                           f" (stderr, %{{customdata[0]}} examples)<extra>{run_id}</extra>"),
            marker={"color": color.get(run_id), "symbol": "star" if final else "circle"}))
    figure.update_layout(xaxis_title="checkpoint step", yaxis_title="accuracy (error bars: +/- 1 stderr)",
                         yaxis_range=[0, 1], height=420)
    return figure


def cartography(data: dict, run_id: str):
    points = data["cartography"][data["cartography"].run_id == run_id]
    figure = go.Figure(go.Scatter(
        x=points.variability, y=points.confidence, mode="markers", text=points.example_id, name=run_id,
        marker={"color": points.correctness, "colorscale": "RdYlGn", "cmin": 0, "cmax": 1, "size": 6,
                "colorbar": {"title": {"text": "correctness"}}},
        hovertemplate="%{text}<br>variability %{x:.3f}<br>confidence %{y:.3f}<extra></extra>"))
    figure.update_layout(title=f"{data['labels'][run_id]} ({run_id})", height=480,
                         xaxis_title="variability (std of p(gold) over epochs)",
                         yaxis_title="confidence (mean p(gold))")
    return figure


def forgetting(data: dict, color: dict):
    figure = go.Figure()
    for run_id in data["tracked"]:
        run = data["run_ids"].index(run_id)
        counts = [row[6] for row in data["examples"] if row[0] == run]  # the examples table's forgetting events
        figure.add_trace(go.Histogram(x=counts, name=data["labels"][run_id], marker={"color": color[run_id]},
                                      opacity=0.6, xbins={"size": 1}))
    figure.update_layout(barmode="overlay", xaxis_title="forgetting events (correct, then wrong at the next training)",
                         yaxis_title="examples", height=420)
    return figure


def cost(data: dict):
    frame = data["cost"]
    labels = [f"{data['labels'][r]} #{n}" for r, n in zip(frame.run_id, frame.launch)]
    figure = go.Figure([
        go.Bar(x=labels, y=frame.training_thread_share * 100, name="training thread, % of training time"),
        go.Bar(x=labels, y=frame.background_share * 100, name="writer's thread CPU, % of training time"),
    ])
    figure.update_layout(barmode="group", yaxis_title="% of training wall time", height=380)
    return figure


def influence(top, label: str):
    """A horizontal bar per training example of `top` (its strongest proponents and opponents), score summed."""
    top = top.sort_values("score")
    figure = go.Figure(go.Bar(
        x=top.score.tolist(), y=top.train_example_id.tolist(), orientation="h",
        marker={"color": ["#2ca02c" if s > 0 else "#d62728" for s in top.score]},
        customdata=top.test_examples.tolist(),
        hovertemplate="%{y}<br>influence %{x:.4g} over %{customdata} test example(s)<extra></extra>"))
    figure.update_layout(title=f"{label}: strongest proponents (green) and opponents (red)",
                         height=max(300, 22 * len(top)),
                         xaxis_title="influence (TracIn score summed over steps and test examples)",
                         yaxis={"type": "category"}, margin={"l": 180})
    return figure
