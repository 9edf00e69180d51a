"""Training and resuming can never damage a run: a refused launch is one line and changes no file of the run folder;
what a launch writes (run.json, exports, parts) always says what happened."""

import errno
import hashlib
import json
import shutil
import subprocess
import sys
import textwrap

import pyarrow.parquet as pq
import pytest
from conftest import ROOT, run_cli, small_config

import loratrace
from loratrace.cli import main
from loratrace.config import load_config


def _snapshot(run):
    """Every file of a run folder with its bytes' hash: a refused command must change none."""
    return {p.relative_to(run).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()}


def _strict_json(path):
    """run.json as a strict reader (DuckDB, jq, a browser) reads it: NaN and Infinity are not JSON."""
    def refuse(constant):
        raise ValueError(f"{path} holds {constant}, which is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tracked run of 10 updates (checkpoints at 9 and 10), trained once; tests work on copies of it."""
    return loratrace.train(small_config(tmp_path_factory.mktemp("trained"), "training.max_steps=10"), progress=False)


@pytest.fixture
def run(trained, tmp_path):
    return shutil.copytree(trained, tmp_path / trained.name)


def _refused(capsys, run, checkpoint, *overrides):
    """`loratrace train --resume-from-checkpoint`: exit 2, one line on stderr, no file of the run changed."""
    before = _snapshot(run)
    code = main(["train", "--resume-from-checkpoint", str(run / "checkpoints" / checkpoint), *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("loratrace: error: "), (code, err)
    assert _snapshot(run) == before
    return err[0]


def test_a_resume_that_would_train_nothing_is_refused(run, capsys):
    for checkpoint, overrides in [("checkpoint-step-010.ckpt", []),  # max_steps 10: the checkpoint's own step
                                  ("checkpoint-step-010.ckpt", ["training.max_steps=9"]),
                                  ("checkpoint-step-009.ckpt", ["training.max_steps=6", "training.stage1_steps=4"])]:
        step = checkpoint[len("checkpoint-step-"):-len(".ckpt")].lstrip("0")
        line = _refused(capsys, run, checkpoint, *overrides)
        assert f"is not past {checkpoint}'s step {step}: the resume would train nothing" in line, line


def test_a_failed_resume_with_a_truncated_attempts_part_changes_nothing(run, capsys):
    part = run / "tracking" / "attempts" / "a000.parquet"
    part.write_bytes(part.read_bytes()[:40])
    line = _refused(capsys, run, "checkpoint-step-009.ckpt", "training.max_steps=12")
    assert f"{part}: unreadable tracking part" in line, line


def test_a_resume_of_a_run_whose_run_json_is_damaged_changes_nothing(run, capsys):
    (run / "run.json").write_text('{"run_id": "x", "attempts": [')
    line = _refused(capsys, run, "checkpoint-step-009.ckpt", "training.max_steps=12")
    assert f"{run / 'run.json'}: not valid JSON" in line, line


def test_a_hole_in_the_tracked_history_is_refused_naming_the_steps(run, capsys):
    part = run / "tracking" / "batches" / "a000-r00-000001.parquet"
    assert sorted(set(pq.read_table(part)["step"].to_pylist())) == [5, 6, 7, 8]
    part.unlink()
    line = _refused(capsys, run, "checkpoint-step-010.ckpt", "training.max_steps=12")
    assert "has no rows for step(s) 5-8 of the history checkpoint-step-010.ckpt continues" in line, line


def test_a_checkpoint_of_another_run_is_refused(run, tmp_path, capsys):
    other = loratrace.train(small_config(tmp_path / "other", "training.max_steps=10"), progress=False)
    shutil.copy(other / "checkpoints" / "checkpoint-step-010.ckpt", run / "checkpoints")
    line = _refused(capsys, run, "checkpoint-step-010.ckpt", "training.max_steps=12")
    assert f"checkpoint-step-010.ckpt was written by run {other.name}, not {run.name}" in line, line


def test_a_checkpoint_written_before_the_run_marker_still_resumes(run):
    import torch

    old = run / "checkpoints" / "checkpoint-step-009.ckpt"
    state = torch.load(old, weights_only=True)
    state.pop("loratrace", None)  # as an untracked launch wrote it before the marker
    del state["callbacks"][f"BatchTracker[{run.name}]"]
    torch.save(state, old)
    cfg = load_config(run / "config.yaml", ["training.max_steps=11", "tracking.enabled=false"])
    loratrace.train(cfg, resume_from=old, progress=False)
    assert _strict_json(run / "run.json")["steps"] == 11


def test_eval_of_final_refuses_a_final_model_a_rewinding_resume_abandoned(run, capsys):
    import lightning as L

    class DieAfterAnUpdate(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            raise RuntimeError("the machine went away")

    assert main(["eval", str(run), "--checkpoints", "final", "--limit", "8"]) == 0  # the finished run: its step 10
    capsys.readouterr()
    evals = pq.read_table(run / "tracking" / "evals").to_pylist()
    assert {(row["checkpoint_path"], row["checkpoint_step"]) for row in evals} >= {("final_model", 10)}
    cfg = load_config(run / "config.yaml", ["training.max_steps=12"])
    with pytest.raises(RuntimeError, match="went away"):
        loratrace.train(cfg, resume_from=run / "checkpoints" / "checkpoint-step-009.ckpt", progress=False,
                        callbacks=[DieAfterAnUpdate()])
    before = _snapshot(run)
    assert main(["eval", str(run), "--checkpoints", "final", "--limit", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"loratrace: error: {run}: final_model is from abandoned attempt 0 (step 10): attempt 1 resumed "
                   "from step 9; evaluate its checkpoints instead"], err
    assert _snapshot(run) == before


def test_a_diverged_run_writes_valid_json_and_says_where_the_loss_stopped_being_finite(tmp_path):
    cfg = small_config(tmp_path, "training.max_steps=4", "training.stage1_steps=2", "tracking.enabled=false")
    # past the config's bounds (which refuse it on the command line): a run that diverges all the same
    cfg.training.learning_rate_stage1 = cfg.training.learning_rate_stage2 = 1e30
    run = loratrace.train(cfg, progress=False)
    info = _strict_json(run / "run.json")
    assert info["status"] == "completed" and info["final_loss"] is None
    assert 1 <= info["non_finite_loss_at_step"] <= 4, info


def _train_failing(monkeypatch, capsys, tmp_path, where, error):
    """`loratrace train` of a fresh small run whose `where` raises `error`: (exit code, stderr lines, run.json)."""
    monkeypatch.setattr(where[0], where[1], error)
    code = main(["train", "--config", str(ROOT / "configs" / "tiny.yaml"), "training.batch_size=8",
                 "training.max_steps=4", "training.stage1_steps=2", "logging.swanlab=false", "tracking.enabled=true",
                 f"--runs-dir={tmp_path}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    (run,) = tmp_path.iterdir()
    return code, err, _strict_json(run / "run.json")


@pytest.mark.parametrize("what", ["base_model", "checkpoint"])
def test_a_full_disk_during_train_is_one_line_naming_the_file_system_and_a_failed_run(what, monkeypatch, capsys,
                                                                                      tmp_path):
    import lightning as L
    from safetensors import SafetensorError

    from loratrace import recipe
    def no_room(*args, **kwargs):
        if what == "base_model":
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                  '"No space left on device" })')
        raise OSError(errno.ENOSPC, "No space left on device", str(args[1]))

    where = (recipe, "save_base_model") if what == "base_model" else (L.Trainer, "save_checkpoint")
    code, err, info = _train_failing(monkeypatch, capsys, tmp_path, where, no_room)
    errors = [line for line in err if line.startswith("loratrace: error:")]
    assert code == 1 and len(errors) == 1 and errors[0] == err[-1], err
    assert "no space left on the file system at /" in errors[0], errors
    assert not any("Traceback" in line for line in err), err
    assert info["status"] == "failed" and info["attempts"][-1]["status"] == "failed"


def test_eval_of_an_empty_or_truncated_checkpoint_is_one_line(run):
    checkpoint = run / "checkpoints" / "checkpoint-step-009.ckpt"
    for damaged in (b"", checkpoint.read_bytes()[:5000]):
        checkpoint.write_bytes(damaged)
        before = _snapshot(run)
        result = run_cli("eval", str(run), "--checkpoints", "9", "--limit", "8")
        err = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(err) == 1, err
        assert err[0].startswith(f"loratrace: error: {checkpoint}: not a readable checkpoint"), err
        assert _snapshot(run) == before
    fine = run_cli("eval", str(run), "--checkpoints", "10", "--limit", "8")
    assert fine.returncode == 0 and "Warning" not in fine.stderr, fine.stderr


_HOLD = textwrap.dedent("""
    import sys, time
    from loratrace.runs import folder
    start_run = folder.start_run
    def start_and_hold(*args, **kwargs):  # the lock is held from here on: keep it long enough for the other launch
        info = start_run(*args, **kwargs)
        time.sleep(8)
        return info
    folder.start_run = start_and_hold
    from loratrace.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_two_resumes_at_once_one_trains_the_other_is_refused(run):
    import os

    args = ["train", "--resume-from-checkpoint", str(run / "checkpoints" / "checkpoint-step-010.ckpt"),
            "training.max_steps=12"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    launches = [subprocess.Popen([sys.executable, "-c", _HOLD, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=env) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in launches]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2).strip().splitlines()
    assert len(refused) == 1 and refused[0].startswith(f"loratrace: error: {run} is being trained by another "
                                                       "process (host "), refused
    rows = pq.read_table(run / "tracking" / "batches").to_pylist()
    steps = [row["step"] for row in rows]
    assert sorted(steps) == list(range(1, 13)), steps  # each step once: no attempt wrote over another's
    info = _strict_json(run / "run.json")
    assert len(info["attempts"]) == 2 and info["steps"] == 12 and not (run / ".train.lock").exists()


def test_the_training_lock_names_its_holder_and_dies_with_it(tmp_path):
    """A holder killed with SIGKILL leaves its lock file behind, but not its lock: the next launch takes it."""
    import os
    import signal

    from loratrace.runs.folder import RunBusy, training_lock

    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from loratrace.runs.folder import training_lock
        with training_lock({str(tmp_path)!r}):
            print("held", flush=True)
            time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunBusy, match=rf"is being trained by another process \(host .+ pid {holder.pid}\)"):
            with training_lock(tmp_path):
                pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert (tmp_path / ".train.lock").exists()  # stale file, no lock
    with training_lock(tmp_path):
        assert f"pid {os.getpid()}" in (tmp_path / ".train.lock").read_text()
    assert not (tmp_path / ".train.lock").exists()
