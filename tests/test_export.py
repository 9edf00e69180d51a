"""`loratrace export RUN --adapters OUT`: every checkpoint as a PEFT adapter folder, a manifest, flat vectors."""

import json
import shutil

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from conftest import run_cli, small_config
from safetensors.numpy import load_file

import loratrace
from loratrace.cli import main
from loratrace.config import load_config
from loratrace.errors import CheckpointError, LoratraceError
from loratrace.export import MANIFEST_FILE, export_adapters, read_flat

WEIGHTS_ONLY_STEP = 4  # rewritten as `checkpoint.tail=weights` writes a tail checkpoint: state_dict + global_step


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """5 updates of 2 micro-batches of 3; checkpoints 2 (stage 1), 3, 4 (weights only), 5."""
    cfg = small_config(tmp_path_factory.mktemp("export-runs"), "training.max_steps=5", "training.stage1_steps=2",
                       "training.batch_size=3", "training.accumulate_grad_batches=2",
                       "checkpoint.stage1_every_n_steps=2", "export.merged_model=false")
    run_dir = loratrace.train(cfg, progress=False)
    path = run_dir / "checkpoints" / f"checkpoint-step-{WEIGHTS_ONLY_STEP:03d}.ckpt"
    full = torch.load(path, map_location="cpu", weights_only=True)
    torch.save({"state_dict": full["state_dict"], "global_step": full["global_step"]}, path)
    return run_dir


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export-out") / "nested" / "adapters"
    export_adapters(run, out, flat=True, progress=False)
    return out


def checkpoint_tensors(run_dir, step):
    """A checkpoint's LoRA tensors under their PEFT adapter names (as adapter_model.safetensors keys them)."""
    state = torch.load(run_dir / "checkpoints" / f"checkpoint-step-{step:03d}.ckpt", map_location="cpu",
                       weights_only=True)["state_dict"]
    return {k.removeprefix("model.").replace(".default.", "."): v for k, v in state.items()}


def a_batch(tokenizer, n=6):
    from loratrace.data.datasets import load_split
    from loratrace.data.encoding import collate, encode, padding_token_id

    examples = load_split("arc-challenge", "sample", "validation", n)
    batch = collate(encode(examples, tokenizer, 256), padding_token_id(tokenizer))
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def test_every_checkpoint_both_kinds_is_an_adapter_folder(run, exported):
    weights_only = torch.load(run / "checkpoints" / f"checkpoint-step-{WEIGHTS_ONLY_STEP:03d}.ckpt",
                              weights_only=True)
    assert set(weights_only) == {"state_dict", "global_step"}
    manifest = pd.read_parquet(exported / "manifest.parquet")
    assert list(manifest.step) == [2, 3, 4, 5]
    for folder in manifest.folder:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (exported / folder).iterdir()}
        config = json.loads((exported / folder / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str((run / "base_model").resolve())
    assert not [p.name for p in exported.parent.iterdir() if p.name != "adapters"]  # no staging folder left


def test_each_adapter_reproduces_its_checkpoints_logits(run, exported):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoTokenizer

    from loratrace.training.model import load_lora_weights, load_run_model, load_small_model

    reference, tokenizer = load_run_model(load_config(run / "config.yaml"), run)
    reference.eval()
    batch = a_batch(AutoTokenizer.from_pretrained(run / "base_model"))
    with torch.no_grad():
        base_logits = load_small_model(run / "base_model")(**batch).logits
    manifest = pd.read_parquet(exported / "manifest.parquet")
    for step, folder in zip(manifest.step, manifest.folder):
        load_lora_weights(reference, run / "checkpoints" / f"checkpoint-step-{step:03d}.ckpt")
        adapter = PeftModel.from_pretrained(load_small_model(run / "base_model"), exported / folder).eval()
        with torch.no_grad():
            expected, got = reference(**batch).logits, adapter(**batch).logits
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
        assert (expected - base_logits).abs().max() > 1e-3  # the LoRA weights matter: the check can fail
    by_name = AutoPeftModelForCausalLM.from_pretrained(exported / manifest.folder.iloc[-1]).eval()  # base from config
    with torch.no_grad():
        torch.testing.assert_close(by_name(**batch).logits, expected, atol=1e-6, rtol=0)


def test_manifest_holds_each_steps_lr_stage_and_batch(run, exported):
    with loratrace.open_runs(run) as db:
        samples = db.sql("SELECT step, stage, lr, example_id, line FROM samples "
                         "ORDER BY step, micro_batch, rank, position").df()
    manifest = duckdb.sql(f"SELECT * FROM read_parquet('{exported / 'manifest.parquet'}') ORDER BY step").df()
    assert list(manifest.stage) == [1, 2, 2, 2]
    assert manifest.lr.iloc[0] != manifest.lr.iloc[1]
    for row in manifest.itertuples():
        members = samples[samples.step == row.step]
        assert len(members) == 6  # both micro-batches of the step
        assert list(row.example_ids) == list(members.example_id) and list(row.lines) == list(members.line)
        assert row.lr == members.lr.iloc[0] and row.stage == members.stage.iloc[0]
        assert row.folder == f"checkpoint-step-{row.step:03d}"
        assert row.checkpoint_file == str(run / "checkpoints" / f"{row.folder}.ckpt")
    assert set(manifest.run_id) == {run.name}


def test_flat_vector_round_trips_into_the_exact_tensors(run, exported):
    layout = json.loads((exported / "flat" / "layout.json").read_text())
    names = [p["name"] for p in layout["parameters"]]
    assert names == sorted(names) and layout["numel"] == sum(p["numel"] for p in layout["parameters"])
    manifest = pd.read_parquet(exported / "manifest.parquet")
    for step, flat, folder in zip(manifest.step, manifest.flat, manifest.folder):
        vector = load_file(exported / flat)["lora"]
        assert vector.dtype == np.float32 and vector.shape == (layout["numel"],)
        expected = checkpoint_tensors(run, step)
        adapter = load_file(exported / folder / "adapter_model.safetensors")
        assert set(expected) == set(names) == set(adapter)
        for p in layout["parameters"]:
            piece = vector[p["offset"]: p["offset"] + p["numel"]].reshape(p["shape"])
            assert np.array_equal(piece, expected[p["name"]].numpy()) and np.array_equal(piece, adapter[p["name"]])
        assert all(torch.equal(t, expected[name]) for name, t in read_flat(exported / flat).items())


def test_steps_range_from_the_cli(run, tmp_path):
    out = tmp_path / "range"
    result = run_cli("export", str(run), "--adapters", str(out), "--steps", "3..4")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "exported 2 adapter(s), steps 3..4" in result.stdout
    assert list(pd.read_parquet(out / "manifest.parquet").step) == [3, 4]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-step-003", "checkpoint-step-004", "manifest.parquet"]


def test_checkpoints_takes_the_selection_of_eval_and_influence(run, tmp_path):
    out = tmp_path / "mixed"
    result = run_cli("export", str(run), "--adapters", str(out), "--checkpoints", "2..3,last")
    assert result.returncode == 0, result.stderr[-2000:]
    assert list(pd.read_parquet(out / "manifest.parquet").step) == [2, 3, 5]
    assert list(export_adapters(run, tmp_path / "last", steps="last", progress=False).step) == [5]
    refused = run_cli("export", str(run), "--adapters", str(tmp_path / "none"), "--steps", "6..9")
    assert refused.returncode == 2 and not (tmp_path / "none").exists()
    assert refused.stderr.strip().splitlines() == [f"loratrace: error: {run} has no checkpoint in steps 6..9 (its 4 "
                                                   "checkpoint(s): steps 2..5)"]


def test_steps_list_and_mixed(run, tmp_path):
    assert list(export_adapters(run, tmp_path / "a", steps="2,5", progress=False).step) == [2, 5]
    assert list(export_adapters(run, tmp_path / "b", steps="2, 4..9", progress=False).step) == [2, 4, 5]


def test_untracked_run_has_null_batches_not_empty_lists(run, tmp_path):
    untracked = tmp_path / "runs" / run.name  # its runs folder apart from the output
    shutil.copytree(run, untracked, ignore=shutil.ignore_patterns("tracking"))
    export_adapters(untracked, tmp_path / "out", steps="2,5", progress=False)
    table = pq.read_table(tmp_path / "out" / "manifest.parquet")
    assert table.column("step").to_pylist() == [2, 5] and table.column("stage").to_pylist() == [1, 2]
    for column in ("example_ids", "lines", "lr"):
        assert table.column(column).to_pylist() == [None, None], column


def test_existing_output_is_refused_or_replaced(run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_cli("export", str(run), "--adapters", str(out))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"loratrace: error: {out} exists and is not empty: choose a new folder, or pass --overwrite to replace it"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and sorted(tmp_path.iterdir()) == [out]
    export_adapters(run, out, steps="5", overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-step-005", "manifest.parquet"]
    assert sorted(tmp_path.iterdir()) == [out]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert list(export_adapters(run, empty, steps="5", progress=False).step) == [5]


def test_a_missing_run_is_one_line_and_writes_nothing(tmp_path):
    result = run_cli("export", str(tmp_path / "no-such-run"), "--adapters", str(tmp_path / "out"))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [f"loratrace: error: {tmp_path / 'no-such-run'} is not a run folder "
                                                  "(no config.yaml)"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("steps, message", [
    ("9", "{run} has no checkpoint at step 9 (its 4 checkpoint(s): steps 2..5)"),
    ("3,9..12", "{run} has no checkpoint in steps 9..12 (its 4 checkpoint(s): steps 2..5)"),
    ("5..3", "--checkpoints 5..3: the range is empty (write the lower step first: 3..5)"),
    ("9..x", "--checkpoints '9..x': use all, last, steps like 76,100, a range like 76..125, or a mix like 1..50,100"),
    ("final", "--checkpoints final: final (the merged final_model/) is eval's only; use last (the latest checkpoint), "
              "or all, last, steps like 76,100, a range like 76..125, or a mix like 1..50,100"),
])
def test_a_step_without_checkpoint_is_one_line_and_writes_nothing(run, tmp_path, steps, message):
    before = sorted(p.name for p in run.rglob("*"))
    with pytest.raises(CheckpointError) as caught:
        export_adapters(run, tmp_path / "out" / "adapters", steps=steps, progress=False)
    assert str(caught.value) == message.format(run=run)
    assert list(tmp_path.iterdir()) == [] and sorted(p.name for p in run.rglob("*")) == before


def test_a_failed_export_leaves_nothing(run, tmp_path):
    broken = tmp_path / "runs" / run.name
    shutil.copytree(run, broken)
    last = broken / "checkpoints" / "checkpoint-step-005.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # cut short: read only after the others were written
    out = tmp_path / "exports" / "adapters"
    with pytest.raises(LoratraceError, match="checkpoint-step-005.ckpt: not a readable checkpoint"):
        export_adapters(broken, out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # neither OUT nor its staging nor its parent
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "mine.txt").write_text("before")
    with pytest.raises(LoratraceError, match="not a readable checkpoint"):
        export_adapters(broken, kept, overwrite=True, progress=False)
    assert [p.name for p in kept.iterdir()] == ["mine.txt"] and (kept / "mine.txt").read_text() == "before"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept", "runs"]


def test_a_named_base_model_is_recorded_as_config_yaml_names_it(run, tmp_path):
    """A run of a hub or local model (here: the shipped tiny base by its folder, which the run's base_model/ copies)."""
    import yaml
    from peft import AutoPeftModelForCausalLM

    from loratrace.training.model import PRETRAINED_DIR

    named = tmp_path / "runs" / run.name  # its runs folder apart from the output
    shutil.copytree(run, named, ignore=shutil.ignore_patterns("base_model"))
    config = yaml.safe_load((named / "config.yaml").read_text())
    config["model"]["name"] = str(PRETRAINED_DIR)
    (named / "config.yaml").write_text(yaml.safe_dump(config))
    export_adapters(named, tmp_path / "out", steps="5", progress=False)
    folder = tmp_path / "out" / "checkpoint-step-005"
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(PRETRAINED_DIR)
    assert AutoPeftModelForCausalLM.from_pretrained(folder) is not None


def test_file_urls_are_the_local_folders_they_name(run, tmp_path, monkeypatch, capsys):
    """`export file://RUN --adapters file://OUT` reads and writes those folders; nothing named `file:` appears."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "adapters"
    assert main(["export", f"file://{run}", "--adapters", f"file://{out}", "--steps", "5"]) == 0
    printed = capsys.readouterr().out
    assert f"to {out}  manifest {out / MANIFEST_FILE}" in printed and "file:" not in printed
    assert pq.read_table(out / MANIFEST_FILE).column("step").to_pylist() == [5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters"]
