import subprocess
import sys

import pandas as pd
from conftest import ROOT


def test_analysis_script_runs_on_a_tracked_run(small_run, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "analysis" / "explore_run.py"), str(small_run), "--out",
                             str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("loss_grad_norm", "example_trajectories", "first_seen", "cartography", "forgetting"):
        png = tmp_path / f"{name}.png"
        assert png.stat().st_size > 5_000 and png.read_bytes()[:4] == b"\x89PNG", name
    tracin = pd.read_csv(tmp_path / "tracincp_checkpoints.csv")
    assert list(tracin.checkpoint_step) == list(range(9, 17))  # the small run's stage-2 checkpoints
    assert all(tracin.lr > 0) and all(f.endswith(".ckpt") for f in tracin.file)
