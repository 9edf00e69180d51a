"""`loratrace influence` against an independent computation, and `checkpoint.tail=weights`.

Two tiny runs of 8 updates (4 in stage 2, batch 4, 24 training rows, cosine lr), one with full tail checkpoints and
one with `checkpoint.tail=weights`. The reference is a plain loop: PeftModel from the run's base and adapter, each
checkpoint's LoRA tensors loaded, one example at a time, training's per-example loss, `torch.autograd.grad`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from conftest import ROOT, run_cli

TAIL = ["training.batch_size=4", "training.max_steps=8", "training.stage1_steps=4", "training.schedule=cosine",
        "data.limit=24", "logging.swanlab=false", "tracking.enabled=true", "export.merged_model=false"]
TESTS = ["LTSYN_VAL_0007", "LTSYN_VAL_0012"]


def _train(runs_dir: Path, *extra: str) -> Path:
    import loratrace
    from loratrace.config import load_config

    return loratrace.train(load_config(ROOT / "configs" / "tiny.yaml", [*TAIL, f"runs_dir={runs_dir}", *extra]),
                           progress=False)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("influence-full"))


@pytest.fixture(scope="module")
def weights_run(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("influence-weights"), "checkpoint.tail=weights", "checkpoint.full_every=2")


class Reference:
    """The independent computation: a PeftModel, one example at a time."""

    def __init__(self, run: Path):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from loratrace.data.datasets import load_split
        from loratrace.data.encoding import encode

        self.run = run
        tokenizer = AutoTokenizer.from_pretrained(run / "base_model")
        self.pad_id = tokenizer.pad_token_id
        base = AutoModelForCausalLM.from_pretrained(run / "base_model")
        self.model = PeftModel.from_pretrained(base, run / "final_adapter").eval()
        for name, p in self.model.named_parameters():
            p.requires_grad_("lora_" in name)
        self.encoded = {e.example_id: e for split, limit in (("train", 24), ("validation", None))
                        for e in encode(load_split("arc-challenge", "sample", split, limit), tokenizer, 256)}

    def load(self, step: int) -> None:
        state = torch.load(self.run / "checkpoints" / f"checkpoint-step-{step:03d}.ckpt", weights_only=True)
        weights = {k.removeprefix("model."): v for k, v in state["state_dict"].items()}
        result = self.model.load_state_dict(weights, strict=False)
        assert not result.unexpected_keys and len(weights) == sum(p.requires_grad for p in self.model.parameters())

    def gradient(self, example_id: str) -> torch.Tensor:
        from loratrace.data.encoding import collate
        from loratrace.training.module import answer_statistics

        batch = collate([self.encoded[example_id]], self.pad_id)
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = answer_statistics(logits, batch)["losses"][0]
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]).double()


@pytest.fixture(scope="module")
def reference(full_run) -> Reference:
    return Reference(full_run)


def _tail(run: Path) -> pd.DataFrame:
    """Members and lr of each stage-2 step, from the samples view."""
    import loratrace

    with loratrace.open_runs(run) as db:
        return db.sql("SELECT step, example_id, line, lr FROM samples WHERE stage = 2 ORDER BY step, position").df()


def test_tracin_equals_a_plain_loop_over_steps_and_skips_the_step_without_a_checkpoint(full_run, reference):
    import loratrace

    notices = []
    from loratrace.attribution.tracin import influence

    frame = influence(full_run, example_ids=TESTS, progress=False, notice=notices.append)
    assert notices == ["tracin: skipped 1 tail step(s) whose preceding checkpoint is missing: 5"]
    tail = _tail(full_run)
    expected: dict[tuple[str, str], float] = {}
    for step, members in tail[tail.step > 5].groupby("step"):  # step 5's checkpoint before it (step 4) was not saved
        reference.load(step - 1)
        tests = {t: reference.gradient(t) for t in TESTS}
        for member, lr in zip(members.example_id, members.lr):
            g = reference.gradient(member)
            for t in TESTS:
                expected[t, member] = expected.get((t, member), 0.0) + lr * float(g @ tests[t])
    assert len(frame) == 2 * 24 and set(frame.train_example_id.groupby(frame.test_example_id).count()) == {24}
    scored = frame[frame.terms > 0]
    assert {(t, m) for t, m in zip(scored.test_example_id, scored.train_example_id)} == set(expected)
    for t, m, score in zip(scored.test_example_id, scored.train_example_id, scored.score):
        assert score == pytest.approx(expected[t, m], rel=1e-5, abs=1e-9)
    untouched = frame[~frame.train_example_id.isin(tail[tail.step > 5].example_id)]
    assert len(untouched) > 0 and (untouched.score == 0.0).all() and (untouched.terms == 0).all()
    assert loratrace.influence is influence


def test_tracin_cp_on_one_checkpoint_is_lr_times_the_dot_product(full_run, reference):
    from loratrace.attribution.tracin import influence

    frame = influence(full_run, example_ids=TESTS[:1], method="tracin-cp", checkpoints="7", progress=False)
    assert len(frame) == 24 and (frame.terms == 1).all()
    lr = float(_tail(full_run).query("step == 7").lr.iloc[0])
    reference.load(7)
    test = reference.gradient(TESTS[0])
    for member in frame.train_example_id.iloc[::6]:  # a sample of four, best to worst
        score = frame.set_index("train_example_id").score[member]
        assert score == pytest.approx(lr * float(reference.gradient(member) @ test), rel=1e-5, abs=1e-9)


def test_tracin_cp_takes_the_checkpoint_selection_of_eval_and_export(full_run):
    from loratrace.attribution.tracin import influence

    args = dict(example_ids=TESTS[:1], method="tracin-cp", progress=False)
    mixed = influence(full_run, checkpoints="6..7,last", **args).set_index("train_example_id")
    assert (mixed.terms == 3).all()
    alone = sum(influence(full_run, checkpoints=str(step), **args).set_index("train_example_id").score
                for step in (6, 7, 8))
    pd.testing.assert_series_equal(mixed.score, alone.loc[mixed.index], rtol=1e-12, check_names=False)


def test_self_influence_is_positive(full_run):
    from loratrace.attribution.tracin import influence

    member = _tail(full_run).query("step == 8").example_id.iloc[0]
    frame = influence(full_run, example_ids=[member], split="train", progress=False)
    mine = frame[frame.train_example_id == member]
    assert len(mine) == 1 and mine.score.iloc[0] > 0 and mine.terms.iloc[0] >= 1


def test_projection_is_seeded_and_close_to_exact(full_run):
    from loratrace.attribution.gradients import Projection
    from loratrace.attribution.tracin import influence

    exact = influence(full_run, example_ids=TESTS[:1], progress=False)
    projected = influence(full_run, example_ids=TESTS[:1], project_dim=512, progress=False)
    both = exact.merge(projected, on=["test_example_id", "train_example_id"], suffixes=("", "_projected"))
    scored = both[both.terms > 0]
    assert scored.score.corr(scored.score_projected) > 0.99 and not (scored.score == scored.score_projected).any()
    assert (both[both.terms == 0].score_projected == 0).all()
    grads = torch.randn(3, 40000)
    assert torch.equal(Projection(64, 7, 40000)(grads), Projection(64, 7, 40000)(grads))  # seeded, blocks alike
    assert not torch.equal(Projection(64, 7, 40000)(grads), Projection(64, 8, 40000)(grads))


def test_a_stopped_computation_continues_with_the_checkpoints_not_done(full_run, monkeypatch):
    import loratrace.attribution.tracin
    from loratrace.attribution.tracin import influence

    loaded, original = [], loratrace.attribution.tracin.load_lora_weights

    def killed_at_the_second(model, checkpoint):
        if len(loaded) == 1:
            raise KeyboardInterrupt  # a Ctrl+C while computing the second checkpoint
        loaded.append(checkpoint.name)
        original(model, checkpoint)

    monkeypatch.setattr(loratrace.attribution.tracin, "load_lora_weights", killed_at_the_second)
    args = dict(example_ids=TESTS[1:], progress=False)
    folder = full_run / "tracking" / "influence"
    existing = set(folder.glob("*.parquet")) if folder.is_dir() else set()
    with pytest.raises(KeyboardInterrupt):
        influence(full_run, **args)
    assert loaded == ["checkpoint-step-005.ckpt"]  # step 6's part: the gradients at the checkpoint before it
    parts = sorted(p.name for p in set(folder.glob("*.parquet")) - existing)
    assert [p[-18:] for p in parts] == ["s000000006.parquet"]
    before = {p: (folder / p).stat().st_mtime_ns for p in parts}
    loaded.clear()
    monkeypatch.setattr(loratrace.attribution.tracin, "load_lora_weights",
                        lambda m, c: (loaded.append(c.name), original(m, c)))
    resumed = influence(full_run, **args)
    assert loaded == ["checkpoint-step-006.ckpt", "checkpoint-step-007.ckpt"]
    assert all((folder / p).stat().st_mtime_ns == t for p, t in before.items())  # done parts were not rewritten
    for p in set(folder.glob("*.parquet")) - existing:
        p.unlink()
    loaded.clear()
    pd.testing.assert_frame_equal(resumed, influence(full_run, **args))  # = computed in one go
    assert len(loaded) == 3 and (resumed.terms > 0).sum() >= 8


def test_cli_table_view_and_one_line_errors(full_run, capsys):
    from loratrace.attribution.tracin import influence
    from loratrace.cli import main

    frame = influence(full_run, example_ids=TESTS[:1], progress=False)
    capsys.readouterr()
    assert main(["influence", str(full_run), "--example-id", TESTS[0], "--top", "3"]) == 0
    out, err = capsys.readouterr()
    best = frame.iloc[0]
    assert "tracin over 3 step(s) (steps 6..8); LTSYN_VAL_0007 (validation): Question:" in out
    helpful = out.split("\nhelpful\n")[1].split("\nharmful\n")[0].splitlines()
    assert len(helpful) == 4 and helpful[1].split()[:2] == [best.train_example_id, str(best.train_line)]
    assert "skipped 1 tail step(s)" in err
    query = ("SELECT train_example_id, sum(score) AS s FROM influence WHERE method = 'tracin' AND project_dim IS NULL "
             "AND test_split = 'validation' AND test_example_id = ? GROUP BY 1 ORDER BY s DESC LIMIT 1")
    assert main(["query", query, "-p", TESTS[0], "--runs-dir", str(full_run), "--format", "json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["train_example_id"] == best.train_example_id and row["s"] == pytest.approx(best.score, rel=1e-12)
    folder = full_run / "tracking" / "influence"
    before = sorted(p.name for p in folder.iterdir())
    for args, message in ((["--example-id", "LTSYN_VAL_7"], "no example 'LTSYN_VAL_7' in the validation split "
                                                            "(closest: LTSYN_VAL_"),
                          (["--checkpoints", "7"], "--checkpoints applies to --method tracin-cp"),
                          (["--method", "tracin-cp", "--checkpoints", "99"], "has no checkpoint at step 99"),
                          (["--method", "tracin-cp", "--checkpoints", "1..4"], "has no checkpoint in steps 1..4 (its "
                                                                                "4 checkpoint(s): steps 5..8)"),
                          (["--method", "tracin-cp", "--checkpoints", "7..x"], "--checkpoints '7..x': use all, last"),
                          (["--method", "tracin-cp", "--checkpoints", "final"], "final (the merged final_model/) is "
                                                                                "eval's only; use last"),
                          (["--limit", "0"], "--limit must be at least 1, got 0")):
        assert main(["influence", str(full_run), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in folder.iterdir()) == before


def test_weights_only_tail_small_refused_for_resume_same_influence(weights_run, full_run):
    from loratrace.attribution.tracin import influence
    from loratrace.evaluate import evaluate_run
    from loratrace.training.checkpoints import is_weights_only

    trainable = sum(v.numel() for v in torch.load(weights_run / "checkpoints" / "checkpoint-step-008.ckpt",
                                                  weights_only=True)["state_dict"].values())
    kinds = {}
    for step in (5, 6, 7, 8):
        path = weights_run / "checkpoints" / f"checkpoint-step-{step:03d}.ckpt"
        kinds[step] = is_weights_only(torch.load(path, weights_only=True))
        if kinds[step]:
            assert path.stat().st_size <= 1.1 * trainable * 4 + 4096
    assert kinds == {5: True, 6: False, 7: True, 8: False}  # full every 2 steps and at the end

    before = sorted((p.name, p.stat().st_mtime_ns) for p in weights_run.rglob("*") if p.is_file())
    weights_only = weights_run / "checkpoints" / "checkpoint-step-007.ckpt"
    refused = run_cli("train", "--resume-from-checkpoint", str(weights_only))
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "checkpoint-step-007.ckpt holds the LoRA weights only" in refused.stderr
    assert f"resume from {weights_run / 'checkpoints' / 'checkpoint-step-006.ckpt'}" in refused.stderr
    assert sorted((p.name, p.stat().st_mtime_ns) for p in weights_run.rglob("*") if p.is_file()) == before

    columns = ["test_example_id", "train_example_id", "train_line", "score", "terms"]
    pd.testing.assert_frame_equal(influence(weights_run, example_ids=TESTS, progress=False)[columns],
                                  influence(full_run, example_ids=TESTS, progress=False)[columns])
    import loratrace

    with loratrace.open_runs(weights_run) as db:
        rows = db.sql("SELECT step, bytes FROM checkpoints ORDER BY step").fetchall()
        mapped = db.sql("SELECT step, checkpoint_step FROM step_checkpoint WHERE step > 4 ORDER BY step").fetchall()
    sizes = {p.name: p.stat().st_size for p in (weights_run / "checkpoints").iterdir()}
    assert rows == [(s, sizes[f"checkpoint-step-{s:03d}.ckpt"]) for s in (5, 6, 7, 8)]
    assert mapped == [(5, 5), (6, 6), (7, 7), (8, 8)]
    accuracy = evaluate_run(weights_run, "5,7", ["eval.limit=4"], progress=False)
    assert list(accuracy.checkpoint_step) == [5, 7]
    evals = pq.read_table(weights_run / "tracking" / "evals").to_pandas()
    assert sorted(set(evals.checkpoint_step)) == [5, 7]


def test_resume_from_a_full_checkpoint_of_a_weights_only_tail(weights_run):
    import loratrace
    from loratrace.config import load_config

    checkpoint = weights_run / "checkpoints" / "checkpoint-step-006.ckpt"
    final = torch.load(weights_run / "checkpoints" / "checkpoint-step-008.ckpt", weights_only=True)["state_dict"]
    written = (weights_run / "checkpoints" / "checkpoint-step-008.ckpt").stat().st_mtime_ns
    loratrace.train(load_config(weights_run / "config.yaml"), resume_from=checkpoint, progress=False)
    assert (weights_run / "checkpoints" / "checkpoint-step-008.ckpt").stat().st_mtime_ns != written
    again = torch.load(weights_run / "checkpoints" / "checkpoint-step-008.ckpt", weights_only=True)["state_dict"]
    assert final.keys() == again.keys() and all(torch.equal(final[k], again[k]) for k in final)
    with loratrace.open_runs(weights_run) as db:
        assert db.sql("SELECT attempt, resumed_step FROM attempts ORDER BY attempt").fetchall() == [(0, 0), (1, 6)]


def test_a_stop_at_a_weights_only_step_writes_a_full_checkpoint(tmp_path):
    import signal

    import lightning as L

    from loratrace.config import ConfigError, load_config
    from loratrace.training.checkpoints import is_weights_only
    from loratrace.training.interrupt import RunInterrupted

    class CtrlCDuringStep5(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 4:
                signal.raise_signal(signal.SIGINT)

    import loratrace

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [*TAIL, f"runs_dir={tmp_path}", "checkpoint.tail=weights",
                                                       "checkpoint.full_every=2", "export.adapter=false"])
    with pytest.raises(RunInterrupted) as stopped:
        loratrace.train(cfg, progress=False, callbacks=[CtrlCDuringStep5()])
    (run,) = tmp_path.iterdir()
    assert str(stopped.value).endswith(f"resume with: loratrace train --resume-from-checkpoint "
                                       f"{run / 'checkpoints' / 'checkpoint-step-005.ckpt'}")
    assert not is_weights_only(torch.load(run / "checkpoints" / "checkpoint-step-005.ckpt", weights_only=True))
    with pytest.raises(ConfigError, match="checkpoint.tail: 'weight' is not one of full, weights"):
        load_config(None, ["checkpoint.tail=weight"])


@pytest.fixture(scope="module")
def sparse_tail_run(tmp_path_factory) -> Path:
    """tail=weights with a checkpoint every 4 updates from step 3 (7, 11, 15, 16) and full_every=8: no tail step is a
    multiple of 8, yet 11 (the first past 8) must be full."""
    return _train(tmp_path_factory.mktemp("influence-sparse"), "training.max_steps=16", "training.stage1_steps=3",
                  "checkpoint.stage2_every_n_steps=4", "checkpoint.tail=weights", "checkpoint.full_every=8",
                  "tracking.enabled=false", "export.adapter=false")


def test_a_sparse_weights_tail_has_a_full_checkpoint_before_its_last(sparse_tail_run):
    from loratrace.training.checkpoints import checkpoint_files, is_weights_only

    kinds = {step: is_weights_only(torch.load(path, weights_only=True))
             for step, path in checkpoint_files(sparse_tail_run)}
    assert kinds == {7: True, 11: False, 15: True, 16: False}  # full where a multiple of 8 was crossed, and the last


def test_a_requeued_trial_resumes_from_the_latest_full_checkpoint(sparse_tail_run, tmp_path):
    """A sweep trial re-queued after a kill continues from its run's latest full checkpoint (not a weights-only one
    after it), or starts over when there is none."""
    import shutil

    from loratrace.sweeps.workers import resume_point

    run = shutil.copytree(sparse_tail_run, tmp_path / sparse_tail_run.name)
    # killed after its last checkpoint (16) but before the end: step 16 again, from 11 (a resume from 16 trains nothing)
    assert resume_point(run, 16) == run / "checkpoints" / "checkpoint-step-011.ckpt"
    (run / "checkpoints" / "checkpoint-step-016.ckpt").unlink()  # killed after 15: the latest file is weights-only
    assert resume_point(run, 16) == run / "checkpoints" / "checkpoint-step-011.ckpt"
    (run / "checkpoints" / "checkpoint-step-011.ckpt").unlink()
    assert resume_point(run, 16) is None  # only weights-only 7 and 15 left: the trial trains from the start
    assert resume_point(tmp_path / "never-written", 16) is None


def test_write_errors_are_one_line_and_leave_nothing_half_written(full_run, capsys, monkeypatch):
    import errno

    import loratrace.track.schema
    from loratrace.attribution.tracin import InfluenceError, influence
    from loratrace.cli import main

    tracking = full_run / "tracking"
    aside = tracking / "influence-aside"
    (tracking / "influence").mkdir(exist_ok=True)
    (tracking / "influence").rename(aside)
    try:
        (tracking / "influence").write_text("a file where the influence folder goes\n")
        assert main(["influence", str(full_run), "--example-id", TESTS[1], "--split", "validation"]) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "error" in line.lower() or "Traceback" in line]
        assert errors == [err.strip().splitlines()[-1]], err  # the notice and progress bar, then one error line
        assert errors[0].startswith(f"loratrace: error: cannot write {tracking / 'influence'}/tracin-"), err
        assert errors[0].endswith(": File exists"), err
        assert (tracking / "influence").read_text() == "a file where the influence folder goes\n"
    finally:
        (tracking / "influence").unlink()
        aside.rename(tracking / "influence")
    before = sorted(p.name for p in (tracking / "influence").iterdir())

    def disk_full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(loratrace.track.schema.os, "replace", disk_full)
    with pytest.raises(InfluenceError, match="cannot write .*tracin-cp-.*: No space left on device$"):
        influence(full_run, example_ids=TESTS[1:], method="tracin-cp", checkpoints="6", progress=False)
    assert sorted(p.name for p in (tracking / "influence").iterdir()) == before  # no part, no .partial


def test_parts_of_a_rewritten_checkpoint_are_computed_again(full_run):
    """Last: it resumes full_run from step 6 and changes checkpoint 7's LoRA tensors (as a resume with other data
    or settings would), so every later computation differs from the one before."""
    import os

    import loratrace
    from loratrace.attribution.tracin import influence
    from loratrace.config import load_config

    both, one, cp = dict(example_ids=TESTS, progress=False), dict(example_ids=TESTS[:1], progress=False), dict(
        example_ids=TESTS[:1], method="tracin-cp", checkpoints="7", progress=False)
    influence(full_run, **both)  # its parts for the second example: stale after the resume, never recomputed
    old = influence(full_run, **one)
    old_cp = influence(full_run, **cp)
    checkpoints = full_run / "checkpoints"
    loratrace.train(load_config(full_run / "config.yaml"), resume_from=checkpoints / "checkpoint-step-006.ckpt",
                    progress=False)
    state = torch.load(checkpoints / "checkpoint-step-007.ckpt", weights_only=True)
    state["state_dict"] = {k: v * 1.5 for k, v in state["state_dict"].items()}
    torch.save(state, checkpoints / "rewritten.tmp")
    os.replace(checkpoints / "rewritten.tmp", checkpoints / "checkpoint-step-007.ckpt")

    again, again_cp = influence(full_run, **one), influence(full_run, **cp)
    with loratrace.open_runs(full_run) as db:
        view = db.sql("SELECT test_example_id, step, train_example_id, train_line, score FROM influence WHERE method "
                      "= 'tracin' AND project_dim IS NULL AND test_split = 'validation'").df()
    step8 = set(view[(view.test_example_id == TESTS[0]) & (view.step == 8)].train_example_id)
    changed = old.merge(again, on=["test_example_id", "train_example_id", "train_line"], suffixes=("_old", ""))
    changed = changed[changed.train_example_id.isin(step8)]
    assert len(changed) == len(step8) > 0 and (changed.score != changed.score_old).all()  # step 8: the new checkpoint 7
    assert not (old_cp.score.values == again_cp.set_index("train_example_id").score[old_cp.train_example_id]).any()
    # The view: the recomputed example's current terms only; the other's terms from before the resume are stale
    # (step 7's batches and step 8's checkpoint were written again), step 6's still hold.
    assert set(view[view.test_example_id == TESTS[1]].step) == {6}
    summed = view[view.test_example_id == TESTS[0]].groupby("train_example_id").score.sum()
    scored = again[(again.test_example_id == TESTS[0]) & (again.terms > 0)].set_index("train_example_id").score
    pd.testing.assert_series_equal(summed.sort_index(), scored.sort_index(), check_names=False, rtol=1e-12)

    for part in (full_run / "tracking" / "influence").iterdir():
        part.unlink()
    pd.testing.assert_frame_equal(again, influence(full_run, **one))  # = a fresh computation
    pd.testing.assert_frame_equal(again_cp, influence(full_run, **cp))
