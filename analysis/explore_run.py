# %% [markdown]
# # Exploring a tracked run
#
# A jupytext "percent" script. Run it as a script:
#
#     python analysis/explore_run.py runs/<run> --out figures/
#
# or open it as a notebook (`jupytext --to notebook analysis/explore_run.py`, then run it in Jupyter): the figures
# show inline, and the run is `RUNS` below, else `$LORATRACE_RUNS`, else the newest run under `runs/`.
#
# Every analysis is one query through the public API (`loratrace.open_runs`), the same SQL a notebook would use.

# %%
import argparse
import os
import sys
from pathlib import Path

import matplotlib

import loratrace

IN_NOTEBOOK = "ipykernel" in sys.modules  # a kernel's argv is its own, and its figures show inline
if not IN_NOTEBOOK:
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# %% tags=["parameters"]
RUNS = None  # a run folder, a folder of runs, or a glob; None: $LORATRACE_RUNS, else the newest run under runs/
OUT = None  # a folder for the PNG files and the TracInCP csv; None: figures only inline (as a script: --out)

# %%
def newest_run(runs_dir: Path) -> Path:
    """The run created last under `runs_dir` (by run.json's created_at, as the runs view reads it)."""
    with loratrace.open_runs(runs_dir) as every_run:
        newest = every_run.sql("SELECT run_id FROM runs ORDER BY created_at DESC, run_id DESC LIMIT 1").fetchall()
    if not newest:
        raise SystemExit(f"no runs under {runs_dir}: train one (loratrace train --track-batches) or set RUNS")
    return runs_dir / newest[0][0]


def default_runs() -> Path:
    """$LORATRACE_RUNS, else the newest run under runs/ (from the repository root or from analysis/)."""
    if os.environ.get("LORATRACE_RUNS"):
        return Path(os.environ["LORATRACE_RUNS"])
    for runs_dir in (Path("runs"), Path("../runs")):
        if runs_dir.is_dir():
            return newest_run(runs_dir)
    raise SystemExit("no runs/ folder here or one level up: set RUNS or $LORATRACE_RUNS to a run folder")


if not IN_NOTEBOOK:
    parser = argparse.ArgumentParser(description="Figures and TracInCP inputs for tracked runs.")
    parser.add_argument("runs", nargs="?", help="a run folder, a folder of runs, or a glob (default: the newest run "
                                                 "under runs/)")
    parser.add_argument("--out", default="analysis/figures", help="where the figures go (default: analysis/figures)")
    args = parser.parse_args()
    RUNS, OUT = args.runs, args.out
runs = RUNS or default_runs()
out = Path(OUT) if OUT else None
if out is not None:
    out.mkdir(parents=True, exist_ok=True)


def finish(fig, name: str) -> None:
    """Lay the figure out and save it as `name`.png when there is an output folder; in a notebook it shows inline."""
    fig.tight_layout()
    if out is not None:
        fig.savefig(out / f"{name}.png")
    if not IN_NOTEBOOK:
        plt.close(fig)


db = loratrace.open_runs(runs)
print(db.sql("SELECT run_id, dataset, steps, checkpoints, status FROM runs").df().to_string(index=False))

# %% [markdown]
# ## Loss and grad-norm per step

# %%
per_step = db.sql("""
    SELECT run_id, step, sum(loss * n_target_tokens) / sum(n_target_tokens) AS loss, max(grad_norm) AS grad_norm
    FROM batches GROUP BY run_id, step ORDER BY run_id, step""").df()
fig, (ax_loss, ax_norm) = plt.subplots(1, 2, figsize=(10, 3.5))
for run_id, rows in per_step.groupby("run_id"):
    ax_loss.plot(rows.step, rows.loss, label=run_id)
    ax_norm.plot(rows.step, rows.grad_norm, label=run_id)
ax_loss.set(xlabel="step", ylabel="loss", title="training loss")
ax_norm.set(xlabel="step", ylabel="grad-norm (before clipping)", title="gradient norm")
finish(fig, "loss_grad_norm")

# %% [markdown]
# ## Per-example loss trajectories (the five most-seen examples)

# %%
trajectories = db.sql("""
    WITH top AS (SELECT example_id FROM samples GROUP BY example_id ORDER BY count(*) DESC, example_id LIMIT 5)
    SELECT example_id, step, loss FROM samples JOIN top USING (example_id) ORDER BY example_id, step""").df()
fig, ax = plt.subplots(figsize=(6, 3.5))
for example_id, rows in trajectories.groupby("example_id"):
    ax.plot(rows.step, rows.loss, marker="o", label=example_id)
ax.set(xlabel="step", ylabel="answer loss", title="per-example loss")
ax.legend(fontsize=7)
finish(fig, "example_trajectories")

# %% [markdown]
# ## Which checkpoint first saw each example

# %%
first_seen = db.sql("SELECT checkpoint_step, count(*) AS examples FROM example_checkpoint WHERE first "
                    "GROUP BY checkpoint_step ORDER BY checkpoint_step").df()
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.bar(first_seen.checkpoint_step.fillna(-1).astype(int), first_seen.examples)
ax.set(xlabel="first checkpoint including the example (-1: none yet)", ylabel="examples", title="first seen")
finish(fig, "first_seen")

# %% [markdown]
# ## Dataset cartography: confidence and variability of p(gold) across epochs

# %%
cartography = db.sql("""
    WITH per_epoch AS (SELECT run_id, example_id, epoch, avg(p_gold) AS p_gold, avg(correct::INT) AS correct
                       FROM samples GROUP BY ALL)
    SELECT run_id, example_id, avg(p_gold) AS confidence, stddev_pop(p_gold) AS variability,
           avg(correct) AS correctness FROM per_epoch GROUP BY ALL""").df()
fig, ax = plt.subplots(figsize=(5, 4))
points = ax.scatter(cartography.variability, cartography.confidence, c=cartography.correctness, cmap="viridis", s=8)
fig.colorbar(points, label="correctness")
ax.set(xlabel="variability", ylabel="confidence", title="data map")
finish(fig, "cartography")

# %% [markdown]
# ## Forgetting events: correct -> incorrect between consecutive trainings on an example

# %%
forgetting = db.sql("""
    WITH seq AS (SELECT run_id, example_id, step, correct,
                        lag(correct) OVER (PARTITION BY run_id, example_id ORDER BY step, micro_batch, rank) AS before
                 FROM samples)
    SELECT run_id, example_id, count(*) FILTER (WHERE before AND NOT correct) AS forgetting_events
    FROM seq GROUP BY ALL""").df()
fig, ax = plt.subplots(figsize=(5, 3.5))
counts = forgetting.forgetting_events.value_counts().sort_index()
ax.bar(counts.index, counts.values)
ax.set(xlabel="forgetting events", ylabel="examples", title="forgetting")
finish(fig, "forgetting")

# %% [markdown]
# ## TracInCP inputs: each checkpoint with the learning rate that produced it

# %%
tracin = db.sql("""
    SELECT c.run_id, c.step AS checkpoint_step, c.file, any_value(b.lr) AS lr
    FROM checkpoints c JOIN batches b USING (run_id, step) GROUP BY ALL ORDER BY c.run_id, c.step""").df()
print(tracin.to_string(index=False))
if out is not None:
    tracin.to_csv(out / "tracincp_checkpoints.csv", index=False)
    print(f"figures in {out}")
