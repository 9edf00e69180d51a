"""import-legacy against damaged and hostile legacy folders (issues #21, #27): it never invents data and never
crashes. Each refusal is one line naming the file, line and key, exit 2, and leaves the source and the runs folder as
they were; what the traditional script really writes is converted, with each oddity counted in import_report.json
and printed."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_cli
from test_legacy import DATASET, jsonl, report, rewrite_jsonl, tree_hash

from loratrace.cli import main
from loratrace.legacy import source
from loratrace.legacy.importer import import_legacy

JSONL = f"batch_tracking_{DATASET}.jsonl"
CHECKPOINT_MAP = f"checkpoint_mapping_{DATASET}.json"
LINE_MAP = f"line_checkpoint_mapping_{DATASET}.json"


def batches(run_dir: Path) -> list[dict]:
    """The imported rows by step, as Arrow holds them (a null line stays None, not NaN)."""
    return sorted(pq.read_table(run_dir / "tracking" / "batches").to_pylist(), key=lambda row: row["step"])


def import_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["import-legacy", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def refused(capsys, source: Path, runs_dir: Path, *more: str) -> str:
    """import-legacy of `source` refused: exit 2, one stderr line, the source and the runs folder untouched."""
    source_before = tree_hash(source)
    runs_before = tree_hash(runs_dir) if runs_dir.exists() else None
    code, _, err = import_cli(capsys, str(source), "--runs-dir", str(runs_dir), *more)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("loratrace: error: "), err
    assert tree_hash(source) == source_before
    assert (tree_hash(runs_dir) if runs_dir.exists() else None) == runs_before
    return err


def damage_row(folder: Path, row: int, change) -> None:
    """Rewrite the JSONL with `change(row_dict)` applied to its row `row` (0-based: JSONL line row + 1)."""
    rows = jsonl(folder)
    change(rows[row])
    rewrite_jsonl(folder, rows)


def rename(old: str, new: str, value):
    def change(row: dict) -> None:
        del row[old]
        row[new] = value
    return change


def setting(key: str, value):
    return lambda row: row.__setitem__(key, value)


# ------------------------------------------------------------------------------------------ values of the wrong kind

WRONG_VALUES = [  # (change to the JSONL's line 3, the key the error names)
    (setting("step", "three"), "step"),
    (rename("step", "global_step", "three"), "global_step"),  # the key as the file spells it
    (setting("step", 0), "step"),
    (setting("step", -4), "step"),
    (setting("step", 2.5), "step"),
    (setting("step", 2**70), "step"),  # past the int64 column: not storable, not to be wrapped
    (setting("epoch", 2**40), "epoch"),
    (setting("loss", "high"), "loss"),
    (setting("epoch", "zero"), "epoch"),
    (setting("epoch", -1), "epoch"),
    (setting("batch_idx", [1]), "batch_idx"),
    (setting("learning_rate", "fast"), "learning_rate"),
    (rename("learning_rate", "lr", {"a": 1}), "lr"),
    (setting("grad_norm", True), "grad_norm"),
    (setting("sample_indices", "1,2,3"), "sample_indices"),
    (setting("sample_indices", [1, "2"]), "sample_indices"),
    (setting("sample_indices", [1.5, 2]), "sample_indices"),
    (setting("sample_indices", [2**70]), "sample_indices"),
    (rename("sample_indices", "indices", [True, False]), "indices"),
    (setting("line_numbers", ["a"]), "line_numbers"),
    (setting("sample_ids", 7), "sample_ids"),
    (setting("timestamp", "yesterday"), "timestamp"),
    (setting("timestamp", [2025]), "timestamp"),
]


@pytest.mark.parametrize("change, key", WRONG_VALUES, ids=[f"{key}-{i}" for i, (_, key) in enumerate(WRONG_VALUES)])
def test_a_wrong_value_in_the_jsonl_is_one_line_naming_file_line_and_key(legacy_copy, tmp_path, capsys, change, key):
    damage_row(legacy_copy, 2, change)
    err = refused(capsys, legacy_copy, tmp_path / "runs")
    assert f"{JSONL} line 3: \"{key}\" is " in err


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=1))


def first_key(data: dict) -> str:
    return next(iter(data))


WRONG_MAPPINGS = [  # (file, change, what the error names)
    (LINE_MAP, lambda d: d.__setitem__("abc", d[first_key(d)]), 'key "abc": not a line number'),
    (LINE_MAP, lambda d: d.__setitem__("0", d[first_key(d)]), 'key "0": not a line number'),
    (LINE_MAP, lambda d: d.__setitem__(first_key(d), 5), "is 5, not an object"),
    (LINE_MAP, lambda d: d[first_key(d)].__setitem__("steps", ["x"]), '"steps" is ["x"]'),
    (LINE_MAP, lambda d: d[first_key(d)].__setitem__("first_checkpoint", 9), '"first_checkpoint" is 9'),
    (CHECKPOINT_MAP, lambda d: d["checkpoint-9"].__setitem__("steps", ["x"]), 'key "checkpoint-9": "steps" is ["x"]'),
    (CHECKPOINT_MAP, lambda d: d.__setitem__("checkpoint-9", 5), 'key "checkpoint-9": is 5, not an object'),
    (CHECKPOINT_MAP, lambda d: d["checkpoint-9"].__setitem__("step", "x"), 'key "checkpoint-9": no step'),
    (CHECKPOINT_MAP, lambda d: d.__setitem__("best", {"steps": [1]}), 'key "best": no step'),
]


@pytest.mark.parametrize("name, change, expected", WRONG_MAPPINGS,
                         ids=[f"{name.split('_')[0]}-{i}" for i, (name, _, _) in enumerate(WRONG_MAPPINGS)])
def test_a_wrong_mapping_entry_is_one_line_naming_file_line_and_key(legacy_copy, tmp_path, capsys, name, change,
                                                                    expected):
    path = legacy_copy / "logs" / name
    edit_json(path, change)
    err = refused(capsys, legacy_copy, tmp_path / "runs")
    assert f"{name} line " in err and expected in err


# ------------------------------------------------------------------------------ the fast reader and the careful one

def read_both(folder: Path) -> tuple[pa.Table | None, dict, pa.Table, dict]:
    """The JSONL as pyarrow's reader (source._read_fast: None when it gives up) and the line-by-line reader read it,
    with the quirks each found."""
    path = folder / "logs" / JSONL
    fast_quirks, careful_quirks = {}, {}
    fast = source._read_fast(path.read_bytes(), fast_quirks)
    careful = source._as_table(source._read_lines(path, path.read_text(), careful_quirks))
    return fast, fast_quirks, careful, careful_quirks


def test_the_fast_reader_reads_what_the_careful_one_reads(legacy_copy):
    rows = jsonl(legacy_copy)[::-1]  # steps out of order: both give them in step order, each with its JSONL line
    del rows[3]["loss"], rows[0]["grad_norm"]
    rows[5]["epoch"] = None
    rows[6]["timestamp"] = "2025-07-20T14:00:06.250000+02:00"  # not the script's own form: parsed one by one
    rewrite_jsonl(legacy_copy, rows)
    fast, fast_quirks, careful, careful_quirks = read_both(legacy_copy)
    assert fast is not None and fast.equals(careful)
    assert list(fast_quirks["missing_fields"].items()) == list(careful_quirks["missing_fields"].items())
    assert fast_quirks == careful_quirks and fast["_line"].to_pylist()[:2] == [12, 11]


FAST_READER_GIVES_UP = {  # a file pyarrow's reader cannot vouch for -> what the careful reader reports (None: nothing)
    "blank_line": (lambda text: text.replace("\n", "\n\n", 1), None),
    "key_alias": (lambda text: text.replace('"step"', '"global_step"', 1), "key_aliases"),
    "cut_short": (lambda text: text + '{"step": 13, "sample_ind', "truncated_last_line"),
    "step_twice": (lambda text: text + text.splitlines(keepends=True)[-1], "repeated_steps"),
    "ids_as_numbers": (lambda text: re.sub(r'"sample_ids": \["[^"]*"', '"sample_ids": [7', text, count=1), None),
    "no_step": (lambda text: text + '{"epoch": 0}\n', "unusable_lines"),
}


@pytest.mark.parametrize("name", sorted(FAST_READER_GIVES_UP))
def test_a_file_the_fast_reader_gives_up_on_is_read_line_by_line(legacy_copy, tmp_path, name):
    """The import then converts it as before: the careful reader's rows and quirks."""
    edit, quirk = FAST_READER_GIVES_UP[name]
    path = legacy_copy / "logs" / JSONL
    path.write_text(edit(path.read_text()))
    fast, _, careful, careful_quirks = read_both(legacy_copy)
    assert fast is None and (quirk is None or quirk in careful_quirks)
    run_dir = Path(import_legacy(legacy_copy, tmp_path / "runs")["run_dir"])
    got = batches(run_dir)
    assert [row["step"] for row in got] == careful["step"].to_pylist() == list(range(1, 13))
    assert report(run_dir)["quirks"].keys() >= careful_quirks.keys()
    if name == "ids_as_numbers":
        assert got[0]["example_ids"][0] == "7"


# ---------------------------------------------------------------------------------------------- rows that are no rows

def test_indices_out_of_the_data_set_are_null_lines_counted_and_printed(legacy_copy, tmp_path, capsys):
    """-5 and 999999 are no rows of the 400-example split: null lines (and null ids, since sample_ids is absent and
    the data set has no such row), listed with their raw value; the examples table holds only the data set."""
    rows = jsonl(legacy_copy)
    for row in rows:
        del row["sample_ids"]
    rows[2]["sample_indices"][:2] = [-5, 999999]
    rewrite_jsonl(legacy_copy, rows)
    code, out, _ = import_cli(capsys, str(legacy_copy), "--runs-dir", str(tmp_path / "runs"))
    assert code == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    got = batches(run_dir)
    kept = rows[2]["sample_indices"][2:]
    assert got[2]["lines"] == [None, None, *kept]
    assert got[2]["example_ids"] == [None, None, *[f"LTSYN_TRA_{n:04d}" for n in kept]]
    quirk = report(run_dir)["quirks"]["rows_out_of_range"]
    assert quirk["count"] == 2 and quirk["rows"] == "0..399"
    assert quirk["first"] == [{"jsonl_line": 3, "step": 3, "index": -5}, {"jsonl_line": 3, "step": 3, "index": 999999}]
    assert "quirk         rows_out_of_range" in out
    lines = pq.read_table(run_dir / "tracking" / "line_checkpoint.parquet").column("line").to_pylist()
    assert -5 not in lines and 999999 not in lines
    examples = pq.read_table(run_dir / "tracking" / "examples.parquet")
    assert examples.num_rows == 400 and examples.column("line").to_pylist() == list(range(400))


def test_an_out_of_range_index_keeps_the_id_the_jsonl_gives(legacy_copy, tmp_path):
    from loratrace.legacy.importer import import_legacy

    damage_row(legacy_copy, 4, lambda row: row["sample_indices"].__setitem__(0, 400))
    given = jsonl(legacy_copy)[4]
    run_dir = Path(import_legacy(legacy_copy, tmp_path / "runs")["run_dir"])
    got = batches(run_dir)
    assert got[4]["lines"] == [None, *given["sample_indices"][1:]]
    assert got[4]["example_ids"] == given["sample_ids"]
    assert report(run_dir)["quirks"]["rows_out_of_range"]["first"] == [{"jsonl_line": 5, "step": 5, "index": 400}]


def test_a_negative_index_is_no_row_even_when_the_data_set_is_gone(legacy_copy, tmp_path):
    from loratrace.legacy.importer import import_legacy

    rows = jsonl(legacy_copy)
    for row in rows:
        del row["sample_ids"]
    rows[0]["sample_indices"][0] = -1
    rewrite_jsonl(legacy_copy, rows)
    config = legacy_copy / "training_config.yaml"
    config.write_text(config.read_text().replace("source: sample", f"source: {tmp_path / 'gone'}"))
    run_dir = Path(import_legacy(legacy_copy, tmp_path / "runs")["run_dir"])
    got = batches(run_dir)
    assert got[0]["lines"][0] is None and got[0]["example_ids"][0] is None  # not "arc-challenge/train/-1"
    assert report(run_dir)["quirks"]["rows_out_of_range"]["rows"] == "0.."


def test_line_numbers_without_indices_are_counted_printed_and_checked(legacy_copy, tmp_path, capsys):
    """The script wrote line_numbers = row + 1: rows come back by that rule, said in the report and the summary; a
    line number 0 is no row (it is not row -1)."""
    rows = jsonl(legacy_copy)
    for row in rows[:3]:
        del row["sample_indices"]
    rows[1]["line_numbers"][0] = 0
    rewrite_jsonl(legacy_copy, rows)
    code, out, _ = import_cli(capsys, str(legacy_copy), "--runs-dir", str(tmp_path / "runs"))
    assert code == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    quirks = report(run_dir)["quirks"]
    assert quirks["rows_from_line_numbers"] == {"rule": "row = line_number - 1", "jsonl_lines": [1, 2, 3]}
    assert quirks["rows_out_of_range"]["first"] == [{"jsonl_line": 2, "step": 2, "index": -1}]
    assert "quirk         rows_from_line_numbers" in out and "quirk         rows_out_of_range" in out
    got = batches(run_dir)
    assert got[1]["lines"] == [None, *[n - 1 for n in rows[1]["line_numbers"][1:]]]


def test_a_line_number_whose_row_is_past_64_bits_is_one_line(legacy_copy, tmp_path, capsys):
    """Without sample_indices a row is line_number - 1: for -2**63 that is no 64-bit value, refused, not wrapped."""
    rows = jsonl(legacy_copy)
    del rows[2]["sample_indices"]
    rows[2]["line_numbers"] = [-2**63]
    rewrite_jsonl(legacy_copy, rows)
    err = refused(capsys, legacy_copy, tmp_path / "runs")
    assert f'{JSONL} line 3: "line_numbers" is [-9223372036854775808], not a list of line numbers' in err


def test_sample_ids_of_another_length_are_not_paired_by_position(legacy_copy, tmp_path):
    """Three ids for four rows cannot say which id is which row: the data set's ids serve that step, counted."""
    from loratrace.legacy.importer import import_legacy

    damage_row(legacy_copy, 3, lambda row: row["sample_ids"].pop())
    given = jsonl(legacy_copy)[3]
    run_dir = Path(import_legacy(legacy_copy, tmp_path / "runs")["run_dir"])
    assert batches(run_dir)[3]["example_ids"] == [f"LTSYN_TRA_{n:04d}" for n in given["sample_indices"]]
    assert report(run_dir)["quirks"]["sample_ids_length_differs"]["steps"] == 1
    assert report(run_dir)["example_ids"]["rule_per_steps"] == {"sample_ids": 11, "data set row": 1}


# ---------------------------------------------------------------------------------------------- the mappings, both ways

def test_a_checkpoint_the_mapping_omits_is_a_disagreement(legacy_copy, tmp_path):
    """The rows and checkpoints/ give checkpoint-10 steps; the legacy mapping does not name it: listed."""
    from loratrace.legacy.importer import import_legacy

    edit_json(legacy_copy / "logs" / CHECKPOINT_MAP, lambda d: d.pop("checkpoint-10"))
    mappings = report(Path(import_legacy(legacy_copy, tmp_path / "runs")["run_dir"]))["mappings"]
    assert mappings["disagreements"] == ["checkpoint-10: the rows give steps [10], absent from the legacy checkpoint "
                                         "mapping"]


def test_a_checkpoint_entry_without_steps_is_a_disagreement(legacy_copy, tmp_path):
    from loratrace.legacy.importer import import_legacy

    edit_json(legacy_copy / "logs" / CHECKPOINT_MAP, lambda d: d["checkpoint-8"].pop("steps"))
    mappings = report(Path(import_legacy(legacy_copy, tmp_path / "runs")["run_dir"]))["mappings"]
    assert mappings["disagreements"] == ["checkpoint-8: the legacy mapping lists no steps, the rows give 1..8"]


# ---------------------------------------------------------------------------------------------- several experiments

def two_experiments(legacy_folder: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    import shutil

    root = tmp_path / "experiments"
    first = root / "alpha" / legacy_folder.name
    second = root / "beta" / legacy_folder.name.replace("icoding", "other")
    shutil.copytree(legacy_folder, first)
    shutil.copytree(legacy_folder, second)
    return root, first, second


def test_when_one_of_several_fails_the_imported_ones_are_listed_and_it_leaves_nothing(legacy_folder, tmp_path,
                                                                                      capsys):
    root, first, second = two_experiments(legacy_folder, tmp_path)
    config = second / "training_config.yaml"
    config.write_text(config.read_text().replace("lora_r: 8", "lora_r: 4"))  # fails while converting checkpoints
    runs_dir = tmp_path / "runs"
    before = tree_hash(root)
    code, out, err = import_cli(capsys, str(root), "--runs-dir", str(runs_dir))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "has shape" in err
    (run_dir,) = runs_dir.iterdir()  # the first, whole; nothing of the second, no staging folder
    assert json.loads((run_dir / "run.json").read_text())["imported_from"] == str(first.resolve())
    assert f"imported 1 of 2 before {second.resolve()} failed (kept): {run_dir}" in out
    assert tree_hash(root) == before


def test_a_damaged_source_among_several_stops_before_any_import(legacy_folder, tmp_path, capsys):
    root, _, second = two_experiments(legacy_folder, tmp_path)
    damage_row(second, 5, setting("step", "six"))
    err = refused(capsys, root, tmp_path / "runs")
    assert f"{second.resolve()}/logs/{JSONL} line 6" in err or f"{second}/logs/{JSONL} line 6" in err
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------- the runs folder

def test_a_runs_dir_that_is_a_file(legacy_copy, tmp_path, capsys):
    target = tmp_path / "runs"
    target.write_text("not a folder\n")
    assert "is a file, not a folder" in refused(capsys, legacy_copy, target)
    assert target.read_text() == "not a folder\n"


def test_a_runs_dir_below_a_file(legacy_copy, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    err = refused(capsys, legacy_copy, tmp_path / "file" / "runs")
    assert "cannot write the run there" in err
    assert (tmp_path / "file").read_text() == "x"


def test_a_failed_import_leaves_no_runs_folder_it_made(legacy_copy, tmp_path, capsys):
    config = legacy_copy / "training_config.yaml"
    config.write_text(config.read_text().replace("lora_r: 8", "lora_r: 4"))  # fails while converting checkpoints
    assert "has shape" in refused(capsys, legacy_copy, tmp_path / "new" / "runs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["experiments"]


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def staged(runs_dir: Path, token: str, owner: dict | None) -> Path:
    folder = runs_dir / ".importing" / token
    (folder / "arc-challenge_lora_20250720_143052" / "tracking").mkdir(parents=True)
    if owner is not None:
        (folder / "owner.json").write_text(json.dumps(owner))
    return folder


def test_only_staging_folders_of_dead_imports_are_removed(legacy_copy, tmp_path, capsys):
    """A killed import's folder goes at the next import; a live process's, another host's, and an unsigned one stay.
    Readers list the runs as if the staging folder were not there, and leave it."""
    runs_dir = tmp_path / "runs"
    host = socket.gethostname()
    abandoned = staged(runs_dir, "abandoned", {"pid": dead_pid(), "host": host})
    live = staged(runs_dir, "live", {"pid": os.getpid(), "host": host})
    elsewhere = staged(runs_dir, "elsewhere", {"pid": dead_pid(), "host": host + "-other"})
    unsigned = staged(runs_dir, "unsigned", None)
    listing = run_cli("runs", "--runs-dir", str(runs_dir), "--format", "json")
    assert listing.returncode != 0 and "Traceback" not in listing.stderr  # no run yet: the staging folder is none
    assert abandoned.is_dir()
    code, out, _ = import_cli(capsys, str(legacy_copy), "--runs-dir", str(runs_dir))
    assert code == 0 and f"removed       {abandoned} (left by an import that was killed)" in out
    assert not abandoned.exists() and live.is_dir() and elsewhere.is_dir() and unsigned.is_dir()
    listing = run_cli("runs", "--runs-dir", str(runs_dir), "--format", "json")
    assert listing.returncode == 0, listing.stderr
    listed = [json.loads(line)["run_id"] for line in listing.stdout.splitlines()]
    assert listed == ["arc-challenge_lora_20250720_143052"]


def test_a_killed_import_is_cleaned_by_the_next(legacy_copy, tmp_path):
    runs_dir = tmp_path / "runs"
    process = subprocess.Popen([sys.executable, "-m", "loratrace", "import-legacy", str(legacy_copy), "--runs-dir",
                                str(runs_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(runs_dir.glob(".importing/*/arc-challenge_lora_*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert list(runs_dir.glob(".importing/*")), "the import ended before it was killed"
    assert not any(p.name != ".importing" for p in runs_dir.iterdir())
    result = run_cli("import-legacy", str(legacy_copy), "--runs-dir", str(runs_dir))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in runs_dir.iterdir()) == ["arc-challenge_lora_20250720_143052"]


# ---------------------------------------------------------------------------------- resume from a damaged folder

RESUME_DAMAGE = [
    (lambda folder: damage_row(folder, 2, setting("step", "three")), f'{JSONL} line 3: "step"'),
    (lambda folder: edit_json(folder / "logs" / LINE_MAP, lambda d: d.__setitem__("abc", {})), 'key "abc"'),
    (lambda folder: edit_json(folder / "logs" / CHECKPOINT_MAP, lambda d: d.__setitem__("checkpoint-9", 5)),
     'key "checkpoint-9"'),
]


@pytest.mark.parametrize("damage, expected", RESUME_DAMAGE, ids=["jsonl-step", "line-key", "checkpoint-entry"])
def test_resume_from_a_damaged_legacy_folder_is_one_line(legacy_copy, tmp_path, damage, expected):
    damage(legacy_copy)
    before = tree_hash(legacy_copy)
    runs_dir = tmp_path / "runs"
    result = run_cli("train", "--resume-from-checkpoint", str(legacy_copy / "checkpoints" / "checkpoint-9"),
                     "--runs-dir", str(runs_dir))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("loratrace: error: ")
    assert expected in result.stderr
    assert tree_hash(legacy_copy) == before and not runs_dir.exists()


def save_torch(value):
    import torch

    return lambda path: torch.save(value, path)


DAMAGED_CHECKPOINT_FILES = [  # (file of checkpoint-9, how it is damaged, what the error says)
    ("rng_state.pth", save_torch({"cpu": [0, 1]}), "rng_state.pth: not the Trainer's RNG state"),
    ("scheduler.pt", save_torch([1, 2]), "scheduler.pt: not a learning-rate scheduler's state"),
]


@pytest.mark.parametrize("name, damage, expected", DAMAGED_CHECKPOINT_FILES, ids=["rng", "scheduler"])
def test_a_trainer_file_of_the_wrong_content_is_one_line(legacy_copy, tmp_path, capsys, name, damage, expected):
    damage(legacy_copy / "checkpoints" / "checkpoint-9" / name)
    assert expected in refused(capsys, legacy_copy, tmp_path / "runs")


@pytest.mark.parametrize("state", [{"global_step": "x"}, [9], {"global_step": 0}], ids=["text", "list", "zero"])
def test_a_trainer_state_without_a_step_is_one_line(legacy_folder, tmp_path, state):
    import shutil

    lone = tmp_path / "hf-output" / "last"  # not named checkpoint-N: the step comes from trainer_state.json
    shutil.copytree(legacy_folder / "checkpoints" / "checkpoint-9", lone)
    (lone / "trainer_state.json").write_text(json.dumps(state))
    result = run_cli("train", "--resume-from-checkpoint", str(lone), "--config",
                     str(legacy_folder / "training_config.yaml"), "--runs-dir", str(tmp_path / "runs"))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("loratrace: error: ")
    assert "trainer_state.json" in result.stderr and not (tmp_path / "runs").exists()


def test_the_rest_of_a_legacy_epoch_skips_indices_that_are_no_rows():
    """A resume continues the legacy epoch with the rows the JSONL shows: a null line (no row) is not trained."""
    from loratrace.legacy.importer import loader_position

    rows = [{"step": 1, "epoch": 0, "batch_idx": 0, "lines": [0, 1]},
            {"step": 2, "epoch": 0, "batch_idx": 1, "lines": [None, 2]},
            {"step": 3, "epoch": 0, "batch_idx": 2, "lines": [None]}]
    assert loader_position(rows, 1, n_examples=5, batch_size=2).batches == [[2], [3, 4]]
