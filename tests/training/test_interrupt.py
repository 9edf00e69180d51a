"""SIGTERM (a scheduler's pre-emption) and Ctrl+C stop a run cleanly: resumable, true status, non-zero exit."""

import json
import signal

import pytest
from conftest import ROOT, SMALL, run_cli, train_then_signal


@pytest.mark.slow
@pytest.mark.parametrize("signum, code, stage1_steps, accumulate", [
    (signal.SIGTERM, 143, 1990, 1),  # stage 1: no checkpoint is due, the stop writes one
    (signal.SIGINT, 130, 1990, 1),
    (signal.SIGTERM, 143, 1, 2),  # stage 2 (a checkpoint every update) under accumulation: the update finishes first
], ids=["sigterm-stage1", "sigint-stage1", "sigterm-stage2-accumulating"])
def test_a_signal_mid_run_leaves_a_resumable_interrupted_run(tmp_path, signum, code, stage1_steps, accumulate):
    args = ["--config", str(ROOT / "configs" / "tiny.yaml"), *SMALL, "training.max_steps=2000",
            f"training.stage1_steps={stage1_steps}", f"training.accumulate_grad_batches={accumulate}"]
    returncode, _, err = train_then_signal(tmp_path, args, signum)
    assert returncode == code, err[-2000:]
    (run,) = tmp_path.iterdir()
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "interrupted" and info["attempts"][-1]["status"] == "interrupted"
    step = info["steps"]
    assert 0 < step < 2000
    last = err.strip().splitlines()[-1]
    expected = run / "checkpoints" / f"checkpoint-step-{step:03d}.ckpt"
    assert last == (f"loratrace: error: interrupted by {signal.Signals(signum).name} after step {step}; "
                    f"resume with: loratrace train --resume-from-checkpoint {expected}")
    assert "Traceback" not in err
    # The stop's checkpoint resumes, and the rows tracked up to it are all there, each step once.
    finished = run_cli("train", "--resume-from-checkpoint", str(expected), "training.max_steps=" + str(step + 2),
                       "training.stage1_steps=" + str(step + 1))
    assert finished.returncode == 0, finished.stderr[-2000:]
    result = run_cli("query", "SELECT count(DISTINCT step) AS steps, count(*) AS rows FROM batches", "--format", "csv",
                     "--runs-dir", str(tmp_path))
    assert result.stdout.splitlines()[1] == f"{step + 2},{(step + 2) * accumulate}"
    saved = run_cli("query", "SELECT count(*) AS rows, count(DISTINCT step) AS steps FROM checkpoints "
                    f"WHERE step <= {step}", "--format", "csv", "--runs-dir", str(tmp_path))
    rows, steps = map(int, saved.stdout.splitlines()[1].split(","))
    assert rows == steps and steps >= 1  # the stop's checkpoint once, not a second time at a scheduled step
    assert json.loads((run / "run.json").read_text())["status"] == "completed"


def test_a_stop_under_several_ranks_names_the_latest_full_checkpoint_before_the_step(tmp_path):
    """Several processes hand the stop to Lightning: no checkpoint of its own is written, and the last one saved may
    be weights-only (checkpoint.tail=weights). The message names the latest full one at or before the step reached."""
    import torch

    from loratrace.training.checkpoints import WEIGHTS_ONLY_MARKER, checkpoint_name
    from loratrace.training.interrupt import checkpoint_to_resume

    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    for step, weights_only in ((4, False), (6, True), (8, True), (10, False)):  # 10: a previous launch, past the stop
        state = {"global_step": step, "state_dict": {}}
        if weights_only:
            state[WEIGHTS_ONLY_MARKER] = {"weights_only": True, "step": step}
        torch.save(state, folder / checkpoint_name(step))
    resumed_from = folder / checkpoint_name(4)
    assert checkpoint_to_resume(tmp_path / "run", 9, last_saved=folder / checkpoint_name(8), world_size=2,
                                resumed_from=None) == folder / checkpoint_name(4)
    assert checkpoint_to_resume(tmp_path / "run", 3, last_saved=None, world_size=2, resumed_from=None) is None
    assert checkpoint_to_resume(tmp_path / "run", 10, last_saved=folder / checkpoint_name(8), world_size=2,
                                resumed_from=resumed_from) == folder / checkpoint_name(10)
    # one process: the stop's own (always full) save at the step reached
    assert checkpoint_to_resume(tmp_path / "run", 9, last_saved=folder / checkpoint_name(9), world_size=1,
                                resumed_from=resumed_from) == folder / checkpoint_name(9)
