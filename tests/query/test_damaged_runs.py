"""Damaged run folders never crash a reader, and `runs` tells the truth (issues #21, #27).

Each case copies the `small_run` session fixture, damages the copy, runs the CLI as a user does, and checks the one
line on stderr, the exit code, the answer for the undamaged runs, and that no file changed (a reader never writes).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_cli

from loratrace.runs.find import DamagedRun, read_run_folder


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _copy(small_run: Path, runs: Path, name: str) -> Path:
    return Path(shutil.copytree(small_run, runs / name))


def _edit_run_json(run: Path, **fields) -> None:
    (run / "run.json").write_text(json.dumps({**json.loads((run / "run.json").read_text()), **fields}))


def _tracking_file(run: Path) -> None:
    shutil.rmtree(run / "tracking")
    (run / "tracking").write_text("not a folder\n")


# damage -> (how, the words the one line must hold besides the file's name)
RUN_DAMAGES = {
    "run.json a list": (lambda r: (r / "run.json").write_text("[1, 2]"), "run.json: the whole file is a list"),
    "run.json a string": (lambda r: (r / "run.json").write_text('"done"'), "run.json: the whole file is a string"),
    "run.json status a number": (lambda r: _edit_run_json(r, status=3), "run.json: status is a whole number"),
    "run.json attempts not a list": (lambda r: _edit_run_json(r, attempts=5), "run.json: attempts is a whole number"),
    "run.json attempt null": (lambda r: _edit_run_json(r, attempts=[None]), "run.json: attempts[0] is null"),
    "run.json not JSON": (lambda r: (r / "run.json").write_text("{not json"), "run.json: not valid JSON"),
    "config.yaml a list": (lambda r: (r / "config.yaml").write_text("- a\n- b\n"),
                           "config.yaml: the whole file is a list"),
    "config.yaml not YAML": (lambda r: (r / "config.yaml").write_text("model: [1,\n"), "config.yaml line 2: not valid"),
    "config.yaml a number": (lambda r: (r / "config.yaml").write_text("42\n"), "config.yaml: the whole file is a"),
    "config.yaml data a number": (lambda r: (r / "config.yaml").write_text(
        (r / "config.yaml").read_text().replace("\ndata:\n", "\ndata: 5\nold_data:\n")), "config.yaml: data is a"),
    "tracking a file": (_tracking_file, "tracking: a file where the tracking folder should be"),
}


@pytest.mark.parametrize("damage", RUN_DAMAGES)
def test_a_damaged_run_is_one_line_naming_the_file(small_run, tmp_path, damage):
    how, words = RUN_DAMAGES[damage]
    run = _copy(small_run, tmp_path, "bad")
    how(run)
    with pytest.raises(DamagedRun) as caught:
        read_run_folder(run)
    assert words in str(caught.value) and str(run) in str(caught.value)
    assert len(str(caught.value).splitlines()) == 1


def test_runs_skips_every_damaged_run_with_one_warning_each(small_run, tmp_path):
    runs = tmp_path / "runs"
    _copy(small_run, runs, "good")
    damaged = {}
    for number, (how, words) in enumerate(RUN_DAMAGES.values()):
        damaged[f"bad{number:02d}"] = words
        how(_copy(small_run, runs, f"bad{number:02d}"))
    before = _hashes(runs)
    listed = run_cli("query", "SELECT dir, status, steps FROM runs", "--format", "json", "--runs-dir", str(runs))
    assert listed.returncode == 0, listed.stderr
    assert [json.loads(line) for line in listed.stdout.splitlines()] == [
        {"dir": str((runs / "good").resolve()), "status": "completed", "steps": 16}]
    warnings = listed.stderr.splitlines()
    assert len(warnings) == len(damaged)
    for warning, (name, words) in zip(sorted(warnings), sorted(damaged.items())):
        assert warning.startswith(f"loratrace: warning: skipping run {name}: {(runs / name).resolve()}")
        assert words in warning
    assert _hashes(runs) == before


@pytest.mark.parametrize("damage", RUN_DAMAGES)
def test_a_query_at_a_damaged_run_fails_in_one_line(small_run, tmp_path, damage):
    how, words = RUN_DAMAGES[damage]
    bad = _copy(small_run, tmp_path, "bad")
    how(bad)
    before = _hashes(bad)
    named = run_cli("query", "SELECT count(*) FROM batches", "--runs-dir", str(bad))
    assert named.returncode == 2 and named.stdout == ""
    assert len(named.stderr.splitlines()) == 1 and named.stderr.startswith("loratrace: error: ")
    assert words in named.stderr and str(bad.resolve()) in named.stderr
    assert _hashes(bad) == before


def test_every_reader_skips_a_damaged_run_or_fails_when_named(small_run, tmp_path):
    runs = tmp_path / "runs"
    good = _copy(small_run, runs, "good")
    bad = _copy(small_run, runs, "bad")
    (bad / "run.json").write_text("[]")
    before = _hashes(runs)
    example_id = pq.read_table(sorted((good / "tracking" / "batches").iterdir())[0])["example_ids"][0][0].as_py()
    warning = f"loratrace: warning: skipping run bad: {bad.resolve() / 'run.json'}: the whole file is a list, " \
              "expected an object"

    for args in (["runs", "--runs-dir", str(runs)], ["trace", "--example-id", example_id, "--runs-dir", str(runs)],
                 ["report", str(runs), "-o", str(tmp_path / "all.html")]):
        result = run_cli(*args)
        assert result.returncode == 0, result.stderr
        assert result.stderr.splitlines() == [warning], args
    assert "id=\"section-curves\"" in (tmp_path / "all.html").read_text()
    over_many = run_cli("compare", str(runs), "--section", "runs")
    assert over_many.returncode == 1 and over_many.stderr.splitlines() == [
        warning, f"loratrace: error: compare needs at least two runs; found 1 in ['{runs}']"]

    error = f"loratrace: error: {bad.resolve() / 'run.json'}: the whole file is a list, expected an object"
    for args in (["compare", str(good), str(bad)], ["report", str(bad), "-o", str(tmp_path / "bad.html")],
                 ["eval", str(bad), "--checkpoints", "last", "--limit", "2"]):
        result = run_cli(*args)
        assert (result.returncode, result.stderr.splitlines()) == (2, [error]), args
    assert not (tmp_path / "bad.html").exists()
    assert _hashes(runs) == before


def _rewrite_part(path: Path, table: pa.Table) -> None:
    pq.write_table(table, path)


def _step_as_string(run: Path) -> Path:
    part = sorted((run / "tracking" / "batches").iterdir())[0]
    table = pq.read_table(part)
    _rewrite_part(part, table.set_column(table.schema.get_field_index("step"), "step", table["step"].cast(pa.string())))
    return part


def _examples_of_another_kind(run: Path) -> Path:
    path = run / "tracking" / "examples.parquet"
    _rewrite_part(path, pa.table({"name": ["a", "b"], "value": [1, 2]}))
    return path


@pytest.mark.parametrize("damage, problem", [(_step_as_string, "column step is string, expected int64"),
                                             (_examples_of_another_kind, "no run_id column")])
def test_a_part_whose_columns_are_wrong_is_skipped_with_one_warning(small_run, tmp_path, damage, problem):
    run = _copy(small_run, tmp_path / "runs", "run")
    part = damage(run)
    before = _hashes(run)
    wanted = "SELECT (SELECT count(*) FROM batches) AS batches, (SELECT count(*) FROM examples) AS examples"
    expected = run_cli("query", wanted, "--format", "json", "--runs-dir", str(small_run))
    counts = json.loads(expected.stdout)
    if damage is _step_as_string:
        counts["batches"] -= pq.read_metadata(part).num_rows
    else:
        counts["examples"] = 0
    warning = f"loratrace: warning: skipping tracking part {part.resolve()}: {problem}"

    for args in (["query", wanted, "--format", "json", "--runs-dir", str(run)], ["runs", "--runs-dir", str(run)],
                 ["report", str(run), "-o", str(tmp_path / "report.html")]):
        result = run_cli(*args)
        # the skipped part's steps are a hole in the history, which a second warning names (test below)
        hole = [line for line in result.stderr.splitlines() if "has no tracked rows for step(s)" in line]
        assert (result.returncode, result.stderr.splitlines()) == (0, [warning, *hole]), (args, result.stderr)
        assert len(hole) == (damage is _step_as_string)
        if args[0] == "query":
            assert json.loads(result.stdout) == counts
    assert _hashes(run) == before


def _smash_data_pages(path: Path) -> None:
    """Overwrite every byte between the magic number and the footer: the footer reads, the data does not."""
    data = bytearray(path.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little")
    data[4: len(data) - footer - 8] = b"\xab" * (len(data) - footer - 12)
    path.write_bytes(bytes(data))
    pq.read_metadata(path)


def test_trace_reads_the_batches_when_the_samples_index_is_damaged(small_run, tmp_path):
    run = _copy(small_run, tmp_path / "runs", "run")
    index = run / "tracking" / "samples_index.parquet"
    _smash_data_pages(index)
    before = _hashes(run)
    example_id, line = pq.read_table(small_run / "tracking" / "samples_index.parquet",
                                     columns=["example_id", "line"]).slice(0, 1).to_pylist()[0].values()
    for key in (["--example-id", example_id], ["--line", str(line)]):
        expected = run_cli("trace", *key, "--format", "csv", "--runs-dir", str(small_run))
        result = run_cli("trace", *key, "--format", "csv", "--runs-dir", str(run))
        assert result.returncode == 0, result.stderr
        assert result.stdout == expected.stdout and expected.stdout.count("\n") > 1
        [warning] = result.stderr.splitlines()
        assert warning.startswith(f"loratrace: warning: samples index {index.resolve()} cannot be read")
    assert _hashes(run) == before


def test_trace_skips_an_examples_file_whose_data_is_damaged(small_run, tmp_path):
    runs = tmp_path / "runs"
    run = _copy(small_run, runs, "run")
    examples = run / "tracking" / "examples.parquet"
    _smash_data_pages(examples)
    before = _hashes(runs)
    for args in (["--example-id", "NO_SUCH_EXAMPLE"], ["--line", "999999"]):
        result = run_cli("trace", *args, "--runs-dir", str(run))
        assert result.returncode == 1 and result.stdout == ""
        lines = result.stderr.splitlines()
        assert lines[-1].startswith("loratrace: error: no run trained ") and "Traceback" not in result.stderr
        assert lines[:-1] in ([], [f"loratrace: warning: skipping damaged tracking part {examples.resolve()}: "
                                   f"{lines[0].split(': ', 3)[-1]}"])
    assert _hashes(runs) == before


# ---------------------------------------------------------------------------------------------- runs tells the truth

def _runs(runs_dir: Path) -> list[dict]:
    result = run_cli("runs", "--format", "json", "--runs-dir", str(runs_dir))
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_a_run_killed_outright_shows_stale(small_run, tmp_path):
    """start_run records the launching process; once that process is SIGKILLed, `runs` says stale (run.json still
    says running: nothing is rewritten), a live process's run stays running, and so does one on another host."""
    runs = tmp_path / "runs"
    killed = _copy(small_run, runs, "killed")
    script = ("import os, signal, sys\nfrom pathlib import Path\nfrom loratrace.runs import folder\n"
              "from loratrace.config import load_config\n"
              "run = Path(sys.argv[1]); folder.start_run(run, load_config(run / 'config.yaml'), None)\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    launched = subprocess.Popen([sys.executable, "-c", script, str(killed)])
    assert launched.wait() == -signal.SIGKILL
    process = json.loads((killed / "run.json").read_text())["attempts"][-1]["process"]
    assert (process["host"], process["pid"]) == (socket.gethostname(), launched.pid)

    alive = _copy(small_run, runs, "alive")
    elsewhere = _copy(small_run, runs, "elsewhere")
    for run, identity in ((alive, {**process, "pid": os.getpid(), "started": None}),
                          (elsewhere, {**process, "host": "another-host"})):
        info = json.loads((run / "run.json").read_text())
        info["attempts"][-1].update(process=identity)
        # a run id of its own: copies of one run id are read once (test_a_copied_run_folder_is_read_once)
        _edit_run_json(run, status="running", attempts=info["attempts"], run_id=run.name)
    before = _hashes(runs)
    assert {Path(r["run_id"]).name: r["status"] for r in _query(runs, "SELECT dir AS run_id, status FROM runs")} == {
        "killed": "stale", "alive": "running", "elsewhere": "running"}
    assert json.loads((killed / "run.json").read_text())["status"] == "running"
    assert _hashes(runs) == before


def _query(runs_dir: Path, sql: str) -> list[dict]:
    result = run_cli("query", sql, "--format", "json", "--runs-dir", str(runs_dir))
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_runs_counts_the_steps_a_deleted_part_left_out(small_run, tmp_path):
    runs = tmp_path / "runs"
    run = _copy(small_run, runs, "run")
    parts = sorted((run / "tracking" / "batches").iterdir())
    gone = set(pq.read_table(parts[1], columns=["step"])["step"].to_pylist())
    parts[1].unlink()
    [listed] = _runs(runs)
    assert (listed["steps"], listed["missing_steps"]) == (16, len(gone)) and len(gone) > 0
    assert _runs(small_run)[0]["missing_steps"] == 0


def test_a_query_over_a_run_with_a_hole_warns_naming_the_steps(small_run, tmp_path):
    runs = tmp_path / "runs"
    run = _copy(small_run, runs, "run")
    parts = sorted((run / "tracking" / "batches").iterdir())
    gone = sorted(set(pq.read_table(parts[1], columns=["step"])["step"].to_pylist()))
    parts[1].unlink()
    result = run_cli("query", "SELECT count(DISTINCT step) AS n FROM batches", "--format", "csv", "--runs-dir",
                     str(runs))
    assert result.returncode == 0 and result.stdout.splitlines() == ["n", str(16 - len(gone))]
    run_id = json.loads((run / "run.json").read_text())["run_id"]
    assert result.stderr.splitlines() == [f"loratrace: warning: run {run_id} has no tracked rows for step(s) {gone[0]}-"
                                          f"{gone[-1]} (a batches part is missing): the views leave those steps out"]
    assert run_cli("query", "SELECT 1", "--runs-dir", str(small_run)).stderr == ""  # no hole, no warning


def test_runs_counts_an_untracked_runs_checkpoint_files(small_run, tmp_path):
    runs = tmp_path / "runs"
    run = _copy(small_run, runs, "run")
    shutil.rmtree(run / "tracking")  # what an untracked run's folder holds: checkpoints, no tracking parts
    files = sorted((run / "checkpoints").glob("checkpoint-step-*.ckpt"))
    [listed] = _runs(runs)
    assert (listed["checkpoints"], listed["last_checkpoint_step"]) == (len(files), 16)
    assert (listed["steps"], listed["missing_steps"]) == (None, None)


@pytest.mark.parametrize("damage, words", [(b"PAR1 cut short", "cannot be read"),
                                           ("params", "a trial's params are not JSON")])
def test_a_report_on_a_study_with_damaged_trials_is_one_line(tmp_path, damage, words):
    from loratrace.track import schema
    study = tmp_path / "sweeps" / "study"
    study.mkdir(parents=True)
    (study / "sweep.json").write_text("{}")
    trials = study / schema.TRIALS_FILE
    if isinstance(damage, bytes):
        trials.write_bytes(damage)
    else:
        row = {"study": "study", "trial": 0, "state": "complete", "params": "{lora: 8", "objective": 1.0,
               "objective_name": "final_loss", "direction": "minimize"}
        pq.write_table(pa.Table.from_pylist([row], schema=schema.TRIALS), trials)
    before = _hashes(tmp_path)
    result = run_cli("report", "--study", str(study), "-o", str(tmp_path / "report.html"))
    assert (result.returncode, result.stdout) == (2, "")
    [line] = result.stderr.splitlines()
    assert line.startswith(f"loratrace: error: {trials.resolve()}: {words}")
    assert _hashes(tmp_path) == before


def test_a_copied_run_folder_is_read_once(small_run, tmp_path):
    """Two folders of one run id would count every row twice: over a runs folder the copy is skipped with one
    warning; named both (compare), one line, exit 2."""
    runs = tmp_path / "runs"
    first, copy = _copy(small_run, runs, "a"), _copy(small_run, runs, "b")
    before = _hashes(runs)
    alone = run_cli("query", "SELECT count(*) AS n FROM batches", "--format", "csv", "--runs-dir", str(small_run))
    both = run_cli("query", "SELECT count(*) AS n FROM batches", "--format", "csv", "--runs-dir", str(runs))
    assert both.returncode == 0 and both.stdout == alone.stdout
    run_id = json.loads((first / "run.json").read_text())["run_id"]
    assert both.stderr.splitlines() == [f"loratrace: warning: skipping {copy.resolve()} holds run {run_id}, as "
                                        f"{first.resolve()} does (a copied run folder?)"]
    compared = run_cli("compare", str(first), str(copy))
    assert compared.returncode == 2 and "Traceback" not in compared.stderr
    assert compared.stderr.splitlines() == [f"loratrace: error: {copy.resolve()} holds run {run_id}, as "
                                            f"{first.resolve()} does (a copied run folder?): name one of them"]
    assert _hashes(runs) == before
