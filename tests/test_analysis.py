"""analysis/explore_run.py runs as a script (PNG files) and as a notebook (inline figures, no argv)."""

import subprocess
import sys

import nbformat
import pandas as pd
from conftest import ROOT
from nbclient import NotebookClient

FIGURES = ("loss_grad_norm", "example_trajectories", "first_seen", "cartography", "forgetting")


def test_analysis_script_runs_on_a_tracked_run(small_run, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "analysis" / "explore_run.py"), str(small_run), "--out",
                             str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in FIGURES:
        png = tmp_path / f"{name}.png"
        assert png.stat().st_size > 5_000 and png.read_bytes()[:4] == b"\x89PNG", name
    tracin = pd.read_csv(tmp_path / "tracincp_checkpoints.csv")
    assert list(tracin.checkpoint_step) == list(range(9, 17))  # the small run's stage-2 checkpoints
    assert all(tracin.lr > 0) and all(f.endswith(".ckpt") for f in tracin.file)


def test_analysis_runs_as_a_notebook_on_the_newest_run(small_run, tmp_path):
    """`jupytext --to notebook`, then a kernel runs it from a folder whose runs/ holds the run: figures inline."""
    (tmp_path / "runs").symlink_to(small_run.parent, target_is_directory=True)
    converted = subprocess.run([sys.executable, "-m", "jupytext", "--to", "notebook", "--output",
                                str(tmp_path / "explore_run.ipynb"), str(ROOT / "analysis" / "explore_run.py")],
                               capture_output=True, text=True, timeout=120)
    assert converted.returncode == 0, converted.stderr[-2000:]
    notebook = nbformat.read(tmp_path / "explore_run.ipynb", as_version=4)
    NotebookClient(notebook, timeout=120, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()

    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    errors = [f"{out.ename}: {out.evalue}" for cell in code for out in cell.outputs if out.output_type == "error"]
    assert errors == []
    printed = "".join(out.get("text", "") for cell in code for out in cell.outputs if out.output_type == "stream")
    assert small_run.name in printed  # the runs table and the TracInCP list name the run it picked
    for name in FIGURES:
        cell = next(cell for cell in code if f'"{name}"' in cell.source)
        images = [out for out in cell.outputs if "image/png" in out.get("data", {})]
        assert len(images) == 1, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["explore_run.ipynb", "runs"]  # no OUT: nothing written
