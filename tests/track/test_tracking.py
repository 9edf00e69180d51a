"""Batch tracking: every micro-batch in Parquet, exactly once across crash and resume."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter

import duckdb
import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT, small_config

import loratrace
from loratrace.config import load_config, save_config
from loratrace.data.datasets import load_split
from loratrace.data.loader import CommonsenseData
from loratrace.track.tracker import BatchTracker
from loratrace.training.model import add_lora, load_base
from loratrace.training.module import LoRAModule


def effective(run_dir):
    with loratrace.open_runs([run_dir]) as db:
        return db.sql("SELECT step, micro_batch, rank, epoch, batch_idx, example_ids, lines, losses, loss, grad_norm, "
                      "lr FROM batches ORDER BY step, micro_batch, rank").df()


def assert_same_rows(a: pd.DataFrame, b: pd.DataFrame):
    assert list(a.step) == list(b.step) and list(a.micro_batch) == list(b.micro_batch)
    assert [list(x) for x in a.example_ids] == [list(x) for x in b.example_ids]
    assert [list(x) for x in a.lines] == [list(x) for x in b.lines]
    np.testing.assert_allclose(np.concatenate(list(a.losses)), np.concatenate(list(b.losses)), atol=1e-5)
    np.testing.assert_allclose(a.grad_norm.fillna(-1), b.grad_norm.fillna(-1), atol=1e-5)
    np.testing.assert_allclose(a.lr, b.lr)


@pytest.mark.slow
def test_tracked_default_run(default_run):
    tracking = default_run / "tracking"
    rows = pd.read_parquet(tracking / "batches")
    assert sorted(rows.step) == list(range(1, 126)) and set(rows.micro_batch) == {0}
    assert set(rows.stage[rows.step <= 75]) == {1} and set(rows.stage[rows.step > 75]) == {2}
    # per-example losses, weighted by answer tokens, average back to the back-propagated loss
    examples = pd.read_parquet(tracking / "examples.parquet")
    assert len(examples) == 400 and examples.example_id.is_unique
    n_target = dict(zip(examples.example_id, examples.n_target_tokens))
    for row in rows.itertuples():
        weights = np.array([n_target[i] for i in row.example_ids])
        assert np.average(row.losses, weights=weights) == pytest.approx(row.loss, rel=1e-5)
        assert len(row.example_ids) == len(row.lines) == len(row.losses) == len(row.p_gold) == len(row.correct)
        assert 0 <= min(row.p_gold) and max(row.p_gold) <= 1
    # every training example exactly once per full epoch (125 updates of 13 batches: epochs 0..8 are full)
    for epoch, group in rows[rows.epoch < 9].groupby("epoch"):
        assert Counter(i for ids in group.example_ids for i in ids) == Counter(examples.example_id), epoch
    # line -> example id agrees with examples.parquet
    line_of = dict(zip(examples.example_id, examples.line))
    assert all(line_of[i] == line for ids, lines in zip(rows.example_ids, rows.lines) for i, line in zip(ids, lines))


@pytest.mark.slow
def test_mappings_agree_with_checkpoints(default_run):
    tracking = default_run / "tracking"
    checkpoints = pd.read_parquet(tracking / "checkpoints")
    assert sorted(checkpoints.step) == list(range(76, 126))
    assert all((default_run / p).stat().st_size == b for p, b in zip(checkpoints.path, checkpoints.bytes))
    step_map = pd.read_parquet(tracking / "step_checkpoint.parquet")
    assert list(step_map.step) == list(range(1, 126))
    assert list(step_map.checkpoint_step) == [max(76, s) for s in range(1, 126)]
    line_map = pd.read_parquet(tracking / "line_checkpoint.parquet")
    rows = pd.read_parquet(tracking / "batches")
    trained = {}
    for step, ids in zip(rows.step, rows.example_ids):
        for i in ids:
            trained.setdefault(i, []).append(step)
    assert len(line_map) == len(trained)
    for row in line_map.itertuples():
        assert list(row.steps) == sorted(trained[row.example_id])
        assert row.first_checkpoint_step == max(76, min(trained[row.example_id]))
        assert row.first_checkpoint_path == f"checkpoints/checkpoint-step-{row.first_checkpoint_step:03d}.ckpt"


def test_resume_inside_an_epoch_and_at_its_boundary_with_accumulation(tmp_path):
    """400 rows / batch 8 / 2 micro-batches: 25 updates an epoch. Resume at 25 (boundary), then, from attempt 0's
    checkpoint 22 (inside the epoch, and off the latest attempt's lineage): rows equal an uninterrupted run's."""
    cfg = small_config(tmp_path, "training.accumulate_grad_batches=2", "training.max_steps=30",
                       "training.stage1_steps=20")
    straight = loratrace.train(cfg, progress=False)
    run = loratrace.train(cfg, progress=False)
    loratrace.train(cfg, resume_from=run / "checkpoints" / "checkpoint-step-025.ckpt", progress=False)
    loratrace.train(cfg, resume_from=run / "checkpoints" / "checkpoint-step-022.ckpt", progress=False)
    expected = effective(straight)
    assert set(expected.micro_batch) == {0, 1} and expected.grad_norm[expected.micro_batch == 0].isna().all()
    assert_same_rows(expected, effective(run))
    with loratrace.open_runs([run]) as db:
        attempts = db.sql("SELECT attempt, parent_attempt, resumed_step FROM attempts ORDER BY attempt").fetchall()
        assert attempts == [(0, None, 0), (1, 0, 25), (2, 0, 22)]
        orphaned = db.sql("SELECT attempt, min(step), max(step), count(*) FROM batches_all WHERE orphaned "
                          "GROUP BY attempt ORDER BY attempt").fetchall()
        assert orphaned == [(0, 23, 30, 16), (1, 26, 30, 10)]  # nothing deleted: 2 micro-batches a step
        assert db.sql("SELECT count(*) FROM batches").fetchall()[0][0] == 60
    # the mapping files follow the effective lineage too: identical to the uninterrupted run's
    for name in ("step_checkpoint.parquet", "line_checkpoint.parquet"):
        ours = pd.read_parquet(run / "tracking" / name).drop(columns="run_id")
        theirs = pd.read_parquet(straight / "tracking" / name).drop(columns="run_id")
        assert len(ours) > 0
        pd.testing.assert_frame_equal(ours, theirs)


@pytest.mark.slow
def test_sigkill_then_resume_reads_like_an_uninterrupted_run(tmp_path):
    extra = ["training.max_steps=40", "training.stage1_steps=10"]
    straight = loratrace.train(small_config(tmp_path / "straight", *extra), progress=False)
    runs_dir = tmp_path / "killed"
    cfg = small_config(runs_dir, *extra)
    save_config(cfg, tmp_path / "killed.yaml")  # the subprocess runs what a user would type
    command = [sys.executable, "-m", "loratrace", "train", "--config", str(tmp_path / "killed.yaml")]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    reads = 0
    try:
        while proc.poll() is None:  # training to step 40 ends by itself: no clock decides
            parts = list(runs_dir.glob("*/tracking/batches/*.parquet"))
            if parts:  # readers polling while training writes never fail
                glob = str(parts[0].parent / "*.parquet")
                pd.read_parquet(parts[0].parent)
                duckdb.sql(f"SELECT count(*) FROM read_parquet('{glob}')").fetchall()
                reads += 1
            if list(runs_dir.glob("*/checkpoints/checkpoint-step-025.ckpt")):
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"training exited with {proc.returncode} before writing checkpoint 25")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert reads > 0
    (run,) = list(runs_dir.iterdir())
    last = max((run / "checkpoints").glob("checkpoint-step-*.ckpt"))
    loratrace.train(load_config(run / "config.yaml"), resume_from=last, progress=False)
    assert_same_rows(effective(straight), effective(run))
    with loratrace.open_runs([run]) as db:
        resumed_step = int(last.stem.rsplit("-", 1)[1])
        orphans = db.sql("SELECT attempt, step FROM batches_all WHERE orphaned").fetchall()
        assert all(attempt == 0 and step > resumed_step for attempt, step in orphans)
        total = db.sql("SELECT count(*) FROM batches_all").fetchall()[0][0]
        assert total == 40 + len(orphans)


class Boom(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 7:
            raise RuntimeError("boom")


def test_tracker_in_a_plain_lightning_loop_flushes_on_exception(tmp_path):
    cfg = small_config(tmp_path)
    model, tokenizer = load_base(cfg.model)
    examples = load_split("arc-challenge", "sample", "train")
    data = CommonsenseData(examples, tokenizer, 256, batch_size=8, seed=1)
    module = LoRAModule(add_lora(model, cfg.lora, 1), cfg.training)
    tracker = BatchTracker(tmp_path / "tracking", run_id="plain", flush_every_steps=100)
    trainer = L.Trainer(max_steps=20, callbacks=[tracker, Boom()], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, use_distributed_sampler=False)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(module, datamodule=data)
    rows = pd.read_parquet(tmp_path / "tracking" / "batches")
    assert sorted(rows.step) == list(range(1, 8))  # through the last finished step, nothing after
    steps = pd.read_parquet(tmp_path / "tracking" / "step_checkpoint.parquet")  # mappings written on the way out
    assert list(steps.step) == list(range(1, 8)) and steps.checkpoint_step.isna().all()
    assert rows.run_id.unique().tolist() == ["plain"]


class Witness(L.Callback):
    """What each micro-batch's training_step returned, read on the spot."""

    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # Lightning hands callbacks loss / accumulate_grad_batches (what it back-propagates); a row holds the loss.
        loss = outputs["loss"].item() * trainer.accumulate_grad_batches
        self.seen.append((list(batch["example_id"]), outputs["losses"].tolist(), loss, outputs["p_gold"].tolist()))


def test_each_row_holds_its_own_micro_batch_numbers(tmp_path):
    """Numbers are read a micro-batch late (no GPU sync per step); each row must still get its own."""
    witness = Witness()
    run = loratrace.train(small_config(tmp_path, "training.max_steps=5", "training.stage1_steps=2",
                                       "training.accumulate_grad_batches=2"), progress=False, callbacks=[witness])
    rows = pd.read_parquet(run / "tracking" / "batches").sort_values(["step", "micro_batch"])
    assert len(rows) == len(witness.seen) == 10
    for row, (ids, losses, loss, p_gold) in zip(rows.itertuples(), witness.seen):
        assert list(row.example_ids) == ids
        np.testing.assert_allclose(row.losses, losses, rtol=1e-6)
        np.testing.assert_allclose(row.p_gold, p_gold, rtol=1e-6)
        assert row.loss == pytest.approx(loss, rel=1e-6)


@pytest.mark.slow
def test_run_json_holds_what_tracking_cost(default_run):
    cost = json.loads((default_run / "run.json").read_text())["attempts"][-1]["tracking_cost"]
    assert cost["updates"] == 125
    assert 0 < cost["training_thread_s"] < cost["train_wall_s"]
    assert cost["background_cpu_s"] > 0 and cost["end_s"] > 0  # 50 checkpoints' parts; the index at the end
    assert cost["training_thread_share"] == pytest.approx(cost["training_thread_s"] / cost["train_wall_s"])
    assert cost["background_share"] == pytest.approx(cost["background_cpu_s"] / cost["train_wall_s"])


class SaveEvery3(L.Callback):
    def __init__(self, folder):
        self.folder = folder

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % 3 == 0:
            trainer.save_checkpoint(self.folder / f"step{trainer.global_step}.ckpt")


def test_cost_counts_a_write_the_step_waits_for_once_and_as_wall_time(tmp_path, monkeypatch):
    """A checkpoint save waits for its rows (flush then wait, inside the hook): on a disk that takes a second per
    part, three saves cost the step three seconds, counted once (the hooks' time never exceeds training's wall time;
    counted twice it would be six seconds), and none of it is writer CPU."""
    from loratrace.track import schema
    write, pause = schema.write_atomic, 1.0

    def slow_disk(table, path):
        if path.parent.name == "batches":
            time.sleep(pause)
        write(table, path)

    monkeypatch.setattr(schema, "write_atomic", slow_disk)
    cfg = small_config(tmp_path)
    model, tokenizer = load_base(cfg.model)
    data = CommonsenseData(load_split("arc-challenge", "sample", "train"), tokenizer, 256, batch_size=8, seed=1)
    module = LoRAModule(add_lora(model, cfg.lora, 1), cfg.training)
    tracker = BatchTracker(tmp_path / "tracking", run_id="plain", flush_every_steps=100)
    trainer = L.Trainer(max_steps=9, callbacks=[tracker, SaveEvery3(tmp_path)], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, use_distributed_sampler=False)
    trainer.fit(module, datamodule=data)
    cost = tracker.cost()
    assert cost["updates"] == 9
    assert 3 * pause <= cost["training_thread_s"] <= cost["train_wall_s"]
    assert cost["background_cpu_s"] < 3 * pause  # CPU time: the sleeps are not in it
    assert len(pd.read_parquet(tmp_path / "tracking" / "batches")) == 9


@pytest.mark.slow
def test_two_rank_ddp_writes_the_global_batch_once(tmp_path):
    from conftest import run_cli

    result = run_cli("train", "--config", str(ROOT / "configs" / "tiny.yaml"), f"--runs-dir={tmp_path}",
                     "training.devices=2", "training.strategy=ddp", "training.accelerator=cpu",
                     "training.max_steps=6", "training.stage1_steps=3", "logging.swanlab=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"cost \d+\.\d% of training time on its thread, \d+\.\d% more CPU", result.stdout)
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir() and (p / "tracking").exists()]
    rows = effective(run)
    assert sorted(set(rows["rank"])) == [0, 1]
    assert {p.name.split("-")[1] for p in (run / "tracking" / "batches").iterdir()} == {"r00", "r01"}  # per rank
    for step, group in rows.groupby("step"):
        ids = [i for ids in group.example_ids for i in ids]
        assert len(ids) == 16 and len(set(ids)) == 16, step  # 2 ranks x batch 8, no example twice
    assert sorted(rows.step.unique()) == list(range(1, 7))


@pytest.mark.slow
def test_two_rank_ddp_resume_ends_in_the_same_weights(tmp_path):
    """Each rank's dropout stream moves with its own batches; a resume gives every rank back its own."""
    import torch
    from conftest import run_cli

    ddp = ["training.devices=2", "training.strategy=ddp", "training.accelerator=cpu", "logging.swanlab=false",
           "logging.tensorboard=false", "export.merged_model=false", "export.adapter=false"]
    result = run_cli("train", "--config", str(ROOT / "configs" / "tiny.yaml"), f"--runs-dir={tmp_path}", *ddp,
                     "training.max_steps=6", "training.stage1_steps=3", "lora.dropout=0.3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir() and (p / "checkpoints").exists()]
    load = lambda step: torch.load(run / "checkpoints" / f"checkpoint-step-{step:03d}.ckpt",  # noqa: E731
                                   weights_only=True)
    rank0, rank1 = load(4)["rng_states_per_rank"]
    assert not torch.equal(rank0["torch"], rank1["torch"])  # the ranks' streams have parted: both are needed
    uninterrupted = load(6)["state_dict"]
    resumed = run_cli("train", "--resume-from-checkpoint", str(run / "checkpoints" / "checkpoint-step-004.ckpt"),
                      *ddp, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    again = load(6)["state_dict"]
    assert again.keys() == uninterrupted.keys()
    assert all(torch.equal(again[k], uninterrupted[k]) for k in uninterrupted)


def test_tracking_without_duckdb_keeps_every_row_and_skips_only_the_index(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    monkeypatch.setitem(sys.modules, "duckdb", None)  # `import duckdb` raises ImportError, as where it is missing
    with pytest.warns(UserWarning, match="samples index not written"):
        run = loratrace.train(small_config(tmp_path, "training.max_steps=4", "training.stage1_steps=2"),
                              progress=False)
    tracking = run / "tracking"
    assert not (tracking / "samples_index.parquet").exists()
    steps = sorted(s for p in (tracking / "batches").glob("*.parquet") for s in pq.read_table(p)["step"].to_pylist())
    assert steps == [1, 2, 3, 4]
    assert (tracking / "step_checkpoint.parquet").is_file() and (tracking / "line_checkpoint.parquet").is_file()


def plain_loop_data(cfg):
    model, tokenizer = load_base(cfg.model)
    data = CommonsenseData(load_split("arc-challenge", "sample", "train"), tokenizer, 256, batch_size=8, seed=1)
    return LoRAModule(add_lora(model, cfg.lora, 1), cfg.training), data


def test_files_of_lightnings_model_checkpoint_get_checkpoint_rows(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    module, data = plain_loop_data(small_config(tmp_path))
    tracker = BatchTracker(tmp_path / "tracking", run_id="plain", flush_every_steps=100)
    saver = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=3, save_top_k=-1)
    trainer = L.Trainer(max_steps=9, callbacks=[tracker, saver], logger=False, enable_progress_bar=False,
                        use_distributed_sampler=False)
    trainer.fit(module, datamodule=data)
    rows = pd.read_parquet(tmp_path / "tracking" / "checkpoints").sort_values("step")
    assert list(rows.step) == [3, 6, 9]
    assert list(rows.path) == [f"checkpoints/epoch=0-step={s}.ckpt" for s in (3, 6, 9)]
    assert all((tmp_path / p).stat().st_size == b for p, b in zip(rows.path, rows.bytes))
    steps = pd.read_parquet(tmp_path / "tracking" / "step_checkpoint.parquet")
    assert list(steps.checkpoint_step) == [3, 3, 3, 6, 6, 6, 9, 9, 9]


class SkipsEveryThirdBatch(L.LightningModule):
    """A plain module: no per-example numbers, and `training_step` returns None (Lightning skips) on batches 1, 4."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(2))

    def training_step(self, batch, batch_idx):
        if batch_idx % 3 == 1:
            return None
        return (batch["x"] * self.weight).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        rows = [{"example_id": f"ex{i}", "line": i, "x": torch.full((2,), float(i))} for i in range(40)]
        return torch.utils.data.DataLoader(rows, batch_size=4)


def test_skipped_micro_batches_write_no_row_and_unknown_numbers_are_null(tmp_path):
    tracker = BatchTracker(tmp_path / "tracking", run_id="plain")
    trainer = L.Trainer(max_steps=6, callbacks=[tracker], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False)
    trainer.fit(SkipsEveryThirdBatch())
    rows = pd.read_parquet(tmp_path / "tracking" / "batches").sort_values("step")
    assert list(rows.step) == [1, 3, 4, 6]  # updates 2 and 5 ran on skipped batches: nothing trained, no row
    assert [list(ids) for ids in rows.example_ids] == [[f"ex{i}" for i in range(b * 4, b * 4 + 4)]
                                                       for b in (0, 2, 3, 5)]
    assert rows.loss.notna().all() and rows.grad_norm.notna().all()
    # what the module did not report is unknown: null, not a stand-in such as the number of examples
    assert rows.n_target_tokens.isna().all() and rows.losses.isna().all() and rows.p_gold.isna().all()


class RowsOnDiskAtEachCheckpoint:
    """A checkpoint listener that reads, when each file has appeared, which steps' rows are on disk."""

    def __init__(self, tracking):
        self.tracking, self.seen = tracking, {}

    def checkpoint_saving(self, trainer, step):
        return None

    def checkpoint_saved(self, trainer, step, path, size):
        self.seen[step] = max(pd.read_parquet(self.tracking / "batches").step)


def test_checkpoint_rows_are_on_disk_before_its_file_whatever_the_callback_order(tmp_path):
    from loratrace.training.checkpoints import StepCheckpoint

    module, data = plain_loop_data(small_config(tmp_path))
    tracker = BatchTracker(tmp_path / "tracking", run_id="plain", flush_every_steps=100)
    witness = RowsOnDiskAtEachCheckpoint(tmp_path / "tracking")
    saver = StepCheckpoint(tmp_path / "checkpoints", [3, 5], listeners=[tracker, witness])
    trainer = L.Trainer(max_steps=5, callbacks=[saver, tracker], logger=False, enable_progress_bar=False,
                        use_distributed_sampler=False)  # the checkpoint writer listed first
    trainer.fit(module, datamodule=data)
    assert witness.seen == {3: 3, 5: 5}
    assert sorted(pd.read_parquet(tmp_path / "tracking" / "checkpoints").step) == [3, 5]


def test_a_tracked_run_prints_no_line_per_checkpoint(tmp_path):
    from conftest import run_cli

    result = run_cli("train", "--config", str(ROOT / "configs" / "tiny.yaml"), f"--runs-dir={tmp_path}",
                     "training.max_steps=5", "training.stage1_steps=2", "logging.swanlab=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(list((run / "checkpoints").glob("*.ckpt"))) == 3
    assert "weights_only" not in result.stderr
