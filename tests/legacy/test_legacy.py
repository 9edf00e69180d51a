"""import-legacy and resuming from Trainer checkpoints, against a folder the traditional script wrote (legacy_script.py:
a real `transformers.Trainer` + PEFT run on the tiny preset, built once per test run)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from conftest import run_cli

from loratrace.cli import main
from loratrace.legacy.checkpoint import LegacyError
from loratrace.legacy.importer import import_legacy
from loratrace.query.index import write_samples_index
from loratrace.query.samples_index import SamplesIndex

DATASET = "arc-challenge"


@pytest.fixture(scope="session")
def imported(legacy_folder, tmp_path_factory) -> Path:
    return Path(import_legacy(legacy_folder, tmp_path_factory.mktemp("imported-runs"))["run_dir"])


def jsonl(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "logs" / f"batch_tracking_{DATASET}.jsonl").read_text().splitlines()]


def rewrite_jsonl(folder: Path, rows: list[dict], tail: str = "") -> None:
    text = "".join(json.dumps(r) + "\n" for r in rows) + tail
    (folder / "logs" / f"batch_tracking_{DATASET}.jsonl").write_text(text)


def batches(run_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "tracking" / "batches").sort_values(["attempt", "step"]).reset_index(drop=True)


def report(run_dir: Path) -> dict:
    return json.loads((run_dir / "import_report.json").read_text())


def tree_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
            digest.update(str(path.stat().st_mtime_ns).encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- a clean import

def test_rows_equal_the_legacy_jsonl(legacy_folder, imported):
    legacy, rows = jsonl(legacy_folder), batches(imported)
    assert imported.name == "arc-challenge_lora_20250720_143052"
    assert rows.step.tolist() == [r["step"] for r in legacy] == list(range(1, 13))
    assert (rows.attempt == 0).all() and (rows.micro_batch == 0).all()
    assert [list(i) for i in rows.example_ids] == [r["sample_ids"] for r in legacy]
    assert [list(i) for i in rows.lines] == [r["sample_indices"] for r in legacy]
    assert rows.loss.tolist() == pytest.approx([r["loss"] for r in legacy], rel=1e-6)
    assert rows.lr.tolist() == [r["learning_rate"] for r in legacy]
    assert rows.grad_norm.tolist() == pytest.approx([r["grad_norm"] for r in legacy], rel=1e-6)
    assert rows.losses.isna().all() and rows.p_gold.isna().all() and rows.n_tokens.isna().all()  # never guessed
    assert rows.stage.tolist() == [1] * 8 + [2] * 4
    assert report(imported)["example_ids"]["rule_per_steps"] == {"sample_ids": 12}


def test_mappings_recomputed_equal_the_legacy_files(legacy_folder, imported):
    assert report(imported)["mappings"]["disagreements_total"] == 0
    legacy_checkpoints = json.loads((legacy_folder / "logs" / f"checkpoint_mapping_{DATASET}.json").read_text())
    steps = pq.read_table(imported / "tracking" / "step_checkpoint.parquet").to_pandas()
    for name, entry in legacy_checkpoints.items():
        assert sorted(steps[steps.checkpoint_step == entry["step"]].step) == entry["steps"], name
    legacy_lines = json.loads((legacy_folder / "logs" / f"line_checkpoint_mapping_{DATASET}.json").read_text())
    lines = pq.read_table(imported / "tracking" / "line_checkpoint.parquet").to_pandas()
    assert len(lines) == len(legacy_lines)
    for row in lines.itertuples():
        entry = legacy_lines[str(row.line + 1)]
        assert list(row.steps) == entry["steps"]
        assert f"checkpoint-{row.first_checkpoint_step}" == entry["first_checkpoint"]


def test_trace_of_an_example_matches_the_legacy_line_mapping(legacy_folder, imported):
    legacy_lines = json.loads((legacy_folder / "logs" / f"line_checkpoint_mapping_{DATASET}.json").read_text())
    line, entry = next((k, v) for k, v in legacy_lines.items() if v["first_checkpoint"] != "checkpoint-8")
    example_id = next(i for r in jsonl(legacy_folder) for i, n in zip(r["sample_ids"], r["line_numbers"])
                      if n == int(line))
    result = run_cli("trace", "--example-id", example_id, "--format", "json", "--runs-dir", str(imported.parent))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(x) for x in result.stdout.splitlines()]
    assert [r["step"] for r in rows] == entry["steps"]
    first = next(r for r in rows if r["first"])
    assert f"checkpoint-{first['checkpoint_step']}" == entry["first_checkpoint"]


def test_the_run_folder_is_complete(legacy_folder, imported):
    info = json.loads((imported / "run.json").read_text())
    assert info["imported"] is True and info["imported_from"] == str(legacy_folder.resolve())
    assert sorted(p.name for p in (imported / "checkpoints").iterdir()) == \
        [f"checkpoint-step-{s:03d}.ckpt" for s in range(8, 13)]
    checkpoints = pd.read_parquet(imported / "tracking" / "checkpoints")
    assert sorted(checkpoints.step) == list(range(8, 13)) and (checkpoints.bytes > 0).all()
    examples = pd.read_parquet(imported / "tracking" / "examples.parquet")
    assert len(examples) == 400 and examples.prompt.notna().all()
    from loratrace.config import load_config

    cfg = load_config(imported / "config.yaml")
    assert (cfg.training.batch_size, cfg.training.max_steps, cfg.training.stage1_steps) == (4, 12, 8)
    assert (cfg.training.learning_rate_stage1, cfg.training.learning_rate_stage2) == (1e-3, 5e-4)
    assert cfg.tracking.enabled and cfg.runs_dir == str(imported.parent)
    from peft import PeftModel
    from safetensors.torch import load_file

    from loratrace.config import ModelConfig
    from loratrace.training.model import load_base

    base, _ = load_base(ModelConfig())
    adapter = PeftModel.from_pretrained(base, imported / "final_adapter")
    legacy = load_file(legacy_folder / "models" / "adapter_model.safetensors")
    name = next(iter(legacy))
    assert torch.equal(adapter.state_dict()[name.replace("lora_A.weight", "lora_A.default.weight")
                                            .replace("lora_B.weight", "lora_B.default.weight")], legacy[name])


def test_import_again_writes_nothing_and_force_copies(legacy_copy, tmp_path):
    runs_dir = tmp_path / "runs"
    before = tree_hash(legacy_copy)
    assert main(["import-legacy", str(legacy_copy.parent), "--runs-dir", str(runs_dir)]) == 0
    first = sorted(runs_dir.iterdir())
    snapshot = tree_hash(runs_dir)
    again = run_cli("import-legacy", str(legacy_copy), "--runs-dir", str(runs_dir))
    assert again.returncode == 0 and "already imported as" in again.stdout
    assert tree_hash(runs_dir) == snapshot
    assert main(["import-legacy", str(legacy_copy), "--runs-dir", str(runs_dir), "--force"]) == 0
    assert sorted(p.name for p in runs_dir.iterdir()) == [first[0].name, first[0].name + "_2"]
    assert tree_hash(legacy_copy) == before  # the source is never modified


def test_file_urls_are_the_local_folders_they_name(legacy_copy, tmp_path, monkeypatch):
    """`import-legacy file://SOURCE --runs-dir file://RUNS` imports into RUNS; nothing named `file:` appears."""
    monkeypatch.chdir(tmp_path)
    runs_dir = tmp_path / "runs"
    assert main(["import-legacy", f"file://{legacy_copy}", "--runs-dir", f"file://{runs_dir}"]) == 0
    (run,) = runs_dir.iterdir()
    assert (run / "tracking" / "samples_index.parquet").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["experiments", "runs"]


# ---------------------------------------------------------------------------------------------- quirks

def test_missing_fields_are_null_and_ids_come_from_the_data_set(legacy_copy, tmp_path):
    rows = jsonl(legacy_copy)
    for row in rows:
        del row["sample_ids"], row["grad_norm"], row["timestamp"]
    rewrite_jsonl(legacy_copy, rows)
    run_dir = Path(import_legacy(legacy_copy, tmp_path / "runs")["run_dir"])
    got = batches(run_dir)
    assert got.grad_norm.isna().all() and got.wall_time.isna().all()
    assert report(run_dir)["quirks"]["missing_fields"] == {"sample_ids": 12, "grad_norm": 12, "timestamp": 12}
    assert report(run_dir)["example_ids"]["rule_per_steps"] == {"data set row": 12}
    assert [list(i) for i in got.example_ids] == [[f"LTSYN_TRA_{n:04d}" for n in r["sample_indices"]] for r in rows]


def test_ids_fall_back_to_positions_when_the_data_set_is_gone(legacy_copy, tmp_path):
    rows = jsonl(legacy_copy)
    for row in rows:
        del row["sample_ids"]
    rewrite_jsonl(legacy_copy, rows)
    config = legacy_copy / "training_config.yaml"
    config.write_text(config.read_text().replace("source: sample", f"source: {tmp_path / 'gone'}"))
    run_dir = Path(import_legacy(legacy_copy, tmp_path / "runs")["run_dir"])
    ids = report(run_dir)["example_ids"]
    assert ids["rule_per_steps"] == {"positional": 12} and "data_set_not_loaded" in ids
    assert list(batches(run_dir).example_ids[0]) == [f"{DATASET}/train/{n}" for n in rows[0]["sample_indices"]]


def test_key_aliases_are_accepted(legacy_folder, legacy_copy, tmp_path):
    renamed = {"step": "global_step", "sample_indices": "indices", "sample_ids": "ids", "learning_rate": "lr"}
    rows = []
    for row in jsonl(legacy_copy):
        row = {renamed.get(k, k): v for k, v in row.items()}
        row["time"] = 1753022000 + row["global_step"]
        del row["timestamp"]
        rows.append(row)
    rewrite_jsonl(legacy_copy, rows)
    run_dir = Path(import_legacy(legacy_copy, tmp_path / "runs")["run_dir"])
    got = batches(run_dir)
    assert report(run_dir)["quirks"]["key_aliases"] == {"global_step": "step", "indices": "sample_indices",
                                                        "ids": "sample_ids", "lr": "learning_rate",
                                                        "time": "timestamp"}
    assert [list(i) for i in got.example_ids] == [r["sample_ids"] for r in jsonl(legacy_folder)]
    assert got.lr.tolist() == [r["learning_rate"] for r in jsonl(legacy_folder)]
    assert got.wall_time[0].timestamp() == 1753022001


def test_the_samples_index_of_an_import_has_the_rows_the_views_query_writes(legacy_copy, tmp_path):
    """import-legacy computes its samples index from the rows in memory (query/index.py, `index_rows`); the views'
    query over the same parts writes the same rows: a negative index (no row: left out), positional ids, an
    example twice in a step."""
    rows = jsonl(legacy_copy)
    for row in rows:
        del row["sample_ids"]
    rows[1]["sample_indices"][0] = -5  # no row even without the data set
    rows[2]["sample_indices"][1] = rows[2]["sample_indices"][0]
    rewrite_jsonl(legacy_copy, rows)
    config = legacy_copy / "training_config.yaml"
    config.write_text(config.read_text().replace("source: sample", f"source: {tmp_path / 'gone'}"))
    run_dir = Path(import_legacy(legacy_copy, tmp_path / "runs")["run_dir"])
    index = run_dir / "tracking" / "samples_index.parquet"
    imported = pq.read_table(index)
    assert SamplesIndex(index).flat and imported.num_rows == sum(len(r["sample_indices"]) for r in rows) - 1
    index.unlink()
    (run_dir / "tracking" / "manifest.json").unlink()
    write_samples_index(run_dir)
    assert pq.read_table(index).equals(imported)


def test_a_last_line_cut_short_is_dropped_and_reported(legacy_copy, tmp_path):
    rows = jsonl(legacy_copy)
    rewrite_jsonl(legacy_copy, rows[:-1], tail=json.dumps(rows[-1])[:40])
    run_dir = Path(import_legacy(legacy_copy, tmp_path / "runs")["run_dir"])
    assert batches(run_dir).step.tolist() == list(range(1, 12))  # step 12 not invented
    assert report(run_dir)["quirks"]["truncated_last_line"]["line"] == 12
    assert report(run_dir)["mappings"]["disagreements_total"] > 0  # the mapping files knew step 12


def test_repeated_steps_unusable_lines_and_other_oddities_are_reported(legacy_copy, tmp_path):
    rows = jsonl(legacy_copy)
    rows[2]["line_numbers"] = [n + 1 for n in rows[2]["line_numbers"]]  # disagrees with sample_indices
    rows.insert(5, dict(rows[4], loss=9.0))  # step 5 logged twice (the script restarted): the last line counts
    rows.insert(7, {"epoch": 0, "loss": 1.0})  # no step, no indices: cannot be placed
    rewrite_jsonl(legacy_copy, rows)
    config = legacy_copy / "training_config.yaml"
    config.write_text(config.read_text() + "output_dir: /somewhere/else\n")
    run_dir = Path(import_legacy(legacy_copy, tmp_path / "runs")["run_dir"])
    quirks = report(run_dir)["quirks"]
    assert quirks["repeated_steps"] == [5] and quirks["unusable_lines"] == [8]
    assert quirks["line_numbers_disagree"] == {"steps": 1, "kept": "sample_indices"}
    assert quirks["config_keys_dropped"] == ["output_dir"]
    got = batches(run_dir)
    assert got.step.tolist() == list(range(1, 13)) and got.loss[4] == 9.0
    assert list(got.lines[2]) == rows[2]["sample_indices"]


def test_a_deleted_checkpoint_keeps_its_row_and_is_reported(legacy_copy, tmp_path):
    shutil.rmtree(legacy_copy / "checkpoints" / "checkpoint-10")
    run_dir = Path(import_legacy(legacy_copy, tmp_path / "runs")["run_dir"])
    assert not (run_dir / "checkpoints" / "checkpoint-step-010.ckpt").exists()
    assert "deleted" in report(run_dir)["checkpoints"]["not_converted"]["checkpoint-10"]
    rows = pd.read_parquet(run_dir / "tracking" / "checkpoints").set_index("step")
    assert pd.isna(rows.loc[10, "bytes"]) and rows.loc[9, "bytes"] > 0
    assert report(run_dir)["mappings"]["disagreements_total"] == 0


def test_disagreement_between_jsonl_and_mapping_is_listed(legacy_copy, tmp_path):
    path = legacy_copy / "logs" / f"line_checkpoint_mapping_{DATASET}.json"
    lines = json.loads(path.read_text())
    line = next(iter(lines))
    lines[line]["steps"] = [99]
    path.write_text(json.dumps(lines))
    run_dir = Path(import_legacy(legacy_copy, tmp_path / "runs")["run_dir"])
    mappings = report(run_dir)["mappings"]
    assert mappings["disagreements_total"] == 1
    assert mappings["disagreements"][0].startswith(f"line {line}: legacy steps [99]")
    assert json.loads(path.read_text())[line]["steps"] == [99]  # reported, the rows are not bent to fit


def test_an_optimizer_that_is_not_adamw_is_reported_and_refused_at_resume(legacy_copy, tmp_path):
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.9)
    sgd.param_groups[0]["params"][0].grad = torch.ones(2)
    sgd.step()
    torch.save(sgd.state_dict(), legacy_copy / "checkpoints" / "checkpoint-9" / "optimizer.pt")
    runs_dir = tmp_path / "runs"
    run_dir = Path(import_legacy(legacy_copy, runs_dir)["run_dir"])
    assert "not AdamW" in report(run_dir)["checkpoints"]["not_converted"]["checkpoint-9"]
    assert (run_dir / "checkpoints" / "checkpoint-step-010.ckpt").is_file()
    result = run_cli("train", "--resume-from-checkpoint", str(legacy_copy / "checkpoints" / "checkpoint-9"),
                     "--runs-dir", str(runs_dir))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("loratrace: error: ")
    assert "not AdamW" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------- bad input

def bad_import(path: Path, runs_dir: Path) -> str:
    result = run_cli("import-legacy", str(path), "--runs-dir", str(runs_dir))
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("loratrace: error: ")
    assert not runs_dir.exists() or not any(runs_dir.iterdir())  # nothing half-written, no temporary folder left
    return result.stderr


def test_a_folder_that_is_not_a_legacy_run(tmp_path):
    (tmp_path / "notes").mkdir()
    assert "is not a legacy run" in bad_import(tmp_path / "notes", tmp_path / "runs")


def test_an_unreadable_jsonl(legacy_copy, tmp_path):
    path = legacy_copy / "logs" / f"batch_tracking_{DATASET}.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:3]) + "{not json\n" + "".join(lines[3:]))
    assert "line 4: not a JSON object" in bad_import(legacy_copy, tmp_path / "runs")


def test_a_checkpoint_whose_lora_shapes_do_not_fit(legacy_copy, tmp_path):
    config = legacy_copy / "training_config.yaml"
    config.write_text(config.read_text().replace("lora_r: 8", "lora_r: 4"))
    assert "has shape" in bad_import(legacy_copy, tmp_path / "runs")


# ---------------------------------------------------------------------------------------------- resume

def test_resume_from_a_legacy_checkpoint_matches_the_trainer(legacy_folder, tmp_path):
    """Step 9 from checkpoint-8: loratrace's LoRA weights equal a Trainer resumed from the same folder, and the
    tracking rows continue at step 9 with the batch the legacy JSONL shows for it."""
    from legacy_script import legacy_trainer
    from safetensors.torch import load_file

    before = tree_hash(legacy_folder)
    checkpoint = legacy_folder / "checkpoints" / "checkpoint-8"
    trainer, _, _ = legacy_trainer(tmp_path / "trainer", max_steps=9)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    legacy = jsonl(legacy_folder)
    assert trainer.batch_rows == legacy[8]["sample_indices"]  # the Trainer's step 9 is the legacy step 9
    expected = {n: p.detach() for n, p in trainer.model.named_parameters() if p.requires_grad}

    runs_dir = tmp_path / "runs"
    assert main(["train", "--resume-from-checkpoint", str(checkpoint), "--runs-dir", str(runs_dir),
                 "training.max_steps=9", "logging.swanlab=false", "export.merged_model=false"]) == 0
    (run_dir,) = runs_dir.iterdir()
    got = load_file(run_dir / "final_adapter" / "adapter_model.safetensors")
    assert len(got) == len(expected) == 16
    for name, tensor in expected.items():
        key = name.replace(".default.weight", ".weight")
        torch.testing.assert_close(got[key], tensor, rtol=1e-5, atol=1e-6)
    rows = batches(run_dir)
    resumed = rows[rows.attempt == 1]
    assert resumed.step.tolist() == [9]
    assert list(resumed.lines.iloc[0]) == legacy[8]["sample_indices"]
    assert resumed.loss.iloc[0] == pytest.approx(legacy[8]["loss"], rel=1e-5)
    assert tree_hash(legacy_folder) == before


def test_the_legacy_epoch_finishes_before_loratrace_order(tmp_path):
    """After the legacy batches the loader rolls into its own next epoch; its length stays an epoch's, and its state
    carries the legacy remainder so that a resume in the middle of it is exact."""
    from loratrace.data.encoding import Encoded
    from loratrace.data.loader import EpochLoader

    examples = [Encoded(f"e{i}", i, [1, 2, 3], 1, [5, 6], 0) for i in range(10)]
    loader = EpochLoader(examples, batch_size=4, seed=1, pad_id=0)
    regular = len(loader)
    legacy_batches = [[9, 8, 7, 6], [5]]
    loader.load_state_dict({"epoch": 0, "offset": 1, "seed": 1, "world_size": 1,
                            "legacy": {"epoch": 0, "start": 1, "batches": legacy_batches}})
    assert len(loader) == regular
    it = iter(loader)
    assert next(it)["line"].tolist() == [9, 8, 7, 6]
    state = loader.state_dict()
    again = EpochLoader(examples, batch_size=4, seed=1, pad_id=0)
    again.load_state_dict(state)
    assert [b["line"].tolist() for b in again] == [[5]]
    fresh = EpochLoader(examples, batch_size=4, seed=1, pad_id=0)
    fresh.load_state_dict({"epoch": 1, "offset": 0, "seed": 1, "world_size": 1})
    assert [b["line"].tolist() for b in again] == [b["line"].tolist() for b in fresh]


def test_a_trainer_checkpoint_outside_a_legacy_run_needs_a_config(legacy_folder, tmp_path):
    lone = tmp_path / "hf-output" / "checkpoint-9"
    shutil.copytree(legacy_folder / "checkpoints" / "checkpoint-9", lone)
    result = run_cli("train", "--resume-from-checkpoint", str(lone), "--runs-dir", str(tmp_path / "runs"))
    assert result.returncode == 2 and "give --config" in result.stderr
    assert not (tmp_path / "runs").exists()
    with pytest.raises(LegacyError, match="not a Trainer checkpoint"):
        from loratrace.legacy.resume import checkpoint_to_resume

        checkpoint_to_resume(tmp_path, None, [])
    # with the config it was trained with (the legacy keys are translated): a new run, continuing at step 10
    result = run_cli("train", "--resume-from-checkpoint", str(lone), "--config",
                     str(legacy_folder / "training_config.yaml"), "--track-batches", "--runs-dir",
                     str(tmp_path / "runs"), "logging.swanlab=false", "export.merged_model=false")
    assert result.returncode == 0, result.stderr
    assert "the data order is loratrace's own from epoch 0" in result.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert batches(run_dir).step.tolist() == [10, 11, 12]
    attempts = pd.read_parquet(run_dir / "tracking" / "attempts")
    assert attempts.resumed_step.tolist() == [9] and attempts.parent_attempt.isna().all()
