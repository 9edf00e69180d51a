"""`loratrace verify`: an untouched run re-executes bit for bit; each kind of tampering fails at its own step.

The session's small run (16 updates, checkpoints 9..16, all full) is copied before anything in it is changed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import ROOT, run_cli

from loratrace.cli import main
from loratrace.track import schema


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "runs" / run.name
    shutil.copytree(run, copy)
    return copy


def _edit_batches(run: Path, step: int, edit) -> None:
    """Rewrite the part holding `step`'s row with `edit(row)` applied to that row (and nothing else)."""
    for path in schema.tracker_parts(run / "tracking" / "batches"):
        table = pq.read_table(path, schema=schema.BATCHES)
        rows = table.to_pylist()
        if any(r["step"] == step for r in rows):
            for row in rows:
                if row["step"] == step:
                    edit(row)
            pq.write_table(pa.Table.from_pylist(rows, schema=schema.BATCHES), path)
            return
    raise AssertionError(f"no part holds step {step}")


def _checkpoint(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"checkpoint-step-{step:03d}.ckpt"


def _verify(run: Path, *args: str):
    result = run_cli("verify", str(run), *args)
    return result.returncode, result.stdout, result.stderr


def test_an_untouched_run_verifies_bit_for_bit_and_writes_nothing(small_run):
    from loratrace.proof.verify import summary, verify

    before = sorted((p.relative_to(small_run), p.stat().st_mtime_ns) for p in small_run.rglob("*"))
    frame = verify(small_run, from_step=11, steps=3)
    assert list(frame.kind) == ["step", "checkpoint"] * 3 and list(frame.step) == [12, 12, 13, 13, 14, 14]
    assert frame.equal.all() and (frame.max_abs_diff == 0).all()
    steps = frame[frame.kind == "step"]
    assert (steps.loss_recorded == steps.loss_replayed).all() and (steps.lr_recorded == steps.lr_replayed).all()
    assert (steps.grad_norm_recorded == steps.grad_norm_replayed).all()
    assert summary(frame) == (True, "verified steps 12-14 from 1 checkpoint: identical")
    assert sorted((p.relative_to(small_run), p.stat().st_mtime_ns) for p in small_run.rglob("*")) == before


@pytest.mark.slow
def test_the_cli_verifies_every_span_of_the_tail(small_run):
    code, out, err = _verify(small_run)
    assert code == 0, err
    assert out.strip().splitlines()[-1] == "verified steps 10-16 from 7 checkpoints: identical"


def test_a_changed_example_id_fails_at_its_step(small_run, tmp_path):
    run = _copy(small_run, tmp_path)
    other = pq.read_table(run / "tracking" / "examples.parquet").column("example_id").to_pylist()

    def swap(row):
        row["example_ids"][2] = next(i for i in other if i not in row["example_ids"])

    _edit_batches(run, 12, swap)
    code, out, err = _verify(run, "--from", "11", "--steps", "2")
    assert code == 1 and out  # the table is printed, the verdict is the one error line
    assert err.startswith("loratrace: error: step 12 differs from the record (re-executed from step 11): loss "), err
    assert len(err.strip().splitlines()) == 1


def test_an_unknown_example_id_fails_at_its_step(small_run, tmp_path):
    run = _copy(small_run, tmp_path)
    _edit_batches(run, 13, lambda row: row["example_ids"].__setitem__(0, "NOT_AN_EXAMPLE"))
    code, _, err = _verify(run, "--from", "12", "--steps", "1")
    assert code == 1 and "step 13 differs" in err and "example NOT_AN_EXAMPLE is not in the training data" in err


def test_an_edited_lr_in_a_part_fails_at_its_step(small_run, tmp_path):
    run = _copy(small_run, tmp_path)
    _edit_batches(run, 12, lambda row: row.__setitem__("lr", row["lr"] * 2))
    code, _, err = _verify(run, "--from", "11", "--steps", "2")
    assert code == 1 and "step 12 differs" in err and "lr recorded 0.001, re-executed 0.0005" in err


def test_an_edited_lr_in_a_checkpoint_fails_at_the_next_step(small_run, tmp_path):
    run = _copy(small_run, tmp_path)
    state = torch.load(_checkpoint(run, 11), weights_only=True)
    state["optimizer_states"][0]["param_groups"][0]["lr"] *= 3
    torch.save(state, _checkpoint(run, 11))
    code, _, err = _verify(run, "--from", "10", "--steps", "3")
    # from 10 the span passes over the edited file: its tensors are the true ones; from 11 the lr is the edited one
    assert code == 0, err
    code, _, err = _verify(run, "--from", "11", "--steps", "1")
    assert code == 1 and "step 12 differs" in err and "lr recorded 0.0005, re-executed 0.0015" in err


def test_a_swapped_checkpoint_file_fails_at_its_step(small_run, tmp_path):
    run = _copy(small_run, tmp_path)
    a, b, aside = _checkpoint(run, 12), _checkpoint(run, 13), run / "checkpoints" / "aside"
    a.rename(aside)
    b.rename(a)
    aside.rename(b)
    code, _, err = _verify(run, "--from", "11", "--steps", "2")
    assert code == 1
    assert "step 12 differs" in err and "checkpoint-step-012.ckpt holds the state after step 13, not 12" in err


def test_a_checkpoint_trained_on_other_data_fails_at_its_step(small_run, tmp_path):
    """A forger's checkpoint: step 12 trained from checkpoint 11 on another batch, in this run's file (its marker
    kept)."""
    from loratrace.proof.engine import Capture, Engine
    from loratrace.proof.record import recorded_micro_batches

    run = _copy(small_run, tmp_path)
    engine = Engine(run)
    recorded = {b.step: b for b in recorded_micro_batches(run)}
    other = recorded[3]  # a stage-1 batch, fed where step 12's was
    capture = Capture({12})
    engine.fit(_checkpoint(run, 11), 12, engine.indices({(recorded[12].epoch, recorded[12].batch_idx):
                                                        other.example_ids}), [capture], root_dir=tmp_path)
    state = torch.load(_checkpoint(run, 12), weights_only=True)
    assert set(state["state_dict"]) == set(capture.weights[12])
    state["state_dict"] = capture.weights[12]
    torch.save(state, _checkpoint(run, 12))
    from loratrace.proof.verify import summary, verify

    frame = verify(run, from_step=11, steps=2, engine=engine)
    failed = frame[~frame.equal]
    assert list(failed.step) == [12] and list(failed.kind) == ["checkpoint"]  # step 13 re-executed from the truth
    assert summary(frame)[1].startswith("step 12 differs from the record (re-executed from step 11): "
                                        "checkpoint-step-012.ckpt: LoRA tensors differ (first: model.")
    frame = verify(run, from_step=12, steps=1, engine=engine)  # from the forged one, step 13 is not what was recorded
    assert summary(frame)[1].startswith("step 13 differs from the record (re-executed from step 12): loss recorded")


def test_verify_refuses_what_it_cannot_start_from(small_run, capsys):
    """The first refusal as a user meets it (a process of its own: no library noise either); the others through the
    same `main` in this process, which has torch loaded already (a process each cost ~7 s of imports)."""
    code, out, err = _verify(small_run, "--from", "5")
    assert (code, out) == (2, "") and err.strip().splitlines() == [
        f"loratrace: error: {small_run} has no checkpoint at step 5 (full checkpoints: 9, 10, 11, 12, 13, 14, 15, 16)"]
    for args, message in ((("--from", "16"), "step 16 is the last recorded step of"),
                          (("--from", "15", "--steps", "3"), "--steps 3 from step 15 goes past the last recorded "
                                                             "step 16"),
                          (("--steps", "0"), "--steps must be at least 1")):
        code = main(["verify", str(small_run), *args])
        out, err = capsys.readouterr()
        assert (code, out) == (2, "") and message in err and len(err.strip().splitlines()) == 1, err
    assert main(["verify", str(ROOT / "configs")]) == 2 and "is not a run folder" in capsys.readouterr().err
