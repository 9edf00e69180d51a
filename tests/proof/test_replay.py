"""`loratrace replay`: a new run folder trained from a checkpoint on the recorded order less the dropped examples.

The session's small run (16 updates, checkpoints 9..16) is copied first: replays are written next to the run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_cli

import loratrace
from loratrace.cli import main
from loratrace.training.checkpoints import read_checkpoint


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "runs" / run.name
    shutil.copytree(run, copy)
    return copy


def _batches(run: Path) -> dict[int, list[str]]:
    with loratrace.open_runs(run) as db:
        rows = db.sql("SELECT step, example_ids FROM batches ORDER BY step, micro_batch").fetchall()
    return {step: list(ids) for step, ids in rows}


def _lora(run: Path, step: int) -> dict:
    return read_checkpoint(run / "checkpoints" / f"checkpoint-step-{step:03d}.ckpt")["state_dict"]


@pytest.fixture(scope="module")
def replayed(small_run, tmp_path_factory):
    """Two replays of a copy from checkpoint 13 for 2 steps, one process: nothing dropped, and two examples of step
    14's batch dropped."""
    run = _copy(small_run, tmp_path_factory.mktemp("replay"))
    dropped = _batches(run)[14][:2]
    same, without = loratrace.replays(run, 13, [[], dropped], steps=2)
    return run, same, without, dropped


def test_a_replay_without_drops_is_the_original(replayed):
    run, same, _, _ = replayed
    info = json.loads((same / "run.json").read_text())
    assert info["status"] == "completed" and info["replay_of"]["run"] == run.name
    assert (info["replay_of"]["step"], info["replay_of"]["dropped"], info["replay_of"]["end_step"]) == (13, [], 15)
    assert sorted(p.name for p in (same / "checkpoints").iterdir()) == ["checkpoint-step-014.ckpt",
                                                                        "checkpoint-step-015.ckpt"]
    original, again = _lora(run, 15), _lora(same, 15)
    assert original.keys() == again.keys() and all((original[k] == again[k]).all() for k in original)
    assert _batches(same) == {step: ids for step, ids in _batches(run).items() if step <= 15}


def test_a_replay_drops_exactly_the_named_examples(replayed):
    run, _, without, dropped = replayed
    info = json.loads((without / "run.json").read_text())["replay_of"]
    assert info["dropped"] == sorted(dropped) and info["removed_from_batches"] == 2
    before, after = _batches(run), _batches(without)
    assert after[14] == [i for i in before[14] if i not in dropped] and len(after[14]) == len(before[14]) - 2
    assert {s: ids for s, ids in after.items() if s != 14} == {s: ids for s, ids in before.items()
                                                             if s <= 15 and s != 14}
    assert any(not (_lora(run, 14)[k] == _lora(without, 14)[k]).all() for k in _lora(run, 14))


def test_the_cli_replays_from_a_file_and_refuses_unknown_examples(small_run, tmp_path, capsys):
    run = _copy(small_run, tmp_path)
    first = _batches(run)[16][0]
    (tmp_path / "drop.txt").write_text(f"# one id a line\n{first}\n")
    result = run_cli("replay", str(run), "--from", "15", "--drop-file", str(tmp_path / "drop.txt"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"replayed step 16 of {run.name} from checkpoints/checkpoint-step-015.ckpt "
                                    "without 1 example(s) (1 removed from its batches): ")
    made = Path(result.stdout.split(": ")[-1].strip())
    assert made.parent == run.parent and first not in _batches(made)[16]
    folders = sorted(p.name for p in run.parent.iterdir())
    result = run_cli("replay", str(run), "--drop", "LTSYN_TRA_99999", "--from", "15")  # as a user meets it
    assert result.returncode == 2 and result.stdout == "" and len(result.stderr.splitlines()) == 1
    assert "--drop: no training example 'LTSYN_TRA_99999' (closest: " in result.stderr
    for args, message in ((["--drop", first, "--from", "4"], "has no checkpoint at step 4"),
                          (["--drop", first, "--steps", "5", "--from", "15"], "the run's record ends at step 16")):
        assert main(["replay", str(run), *args]) == 2  # the same `main`, in this process (torch loaded already)
        out, err = capsys.readouterr()
        assert out == "" and message in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in run.parent.iterdir()) == folders  # a refused replay makes no folder


def test_runs_lists_where_a_replay_comes_from(replayed):
    run, same, without, dropped = replayed
    with loratrace.open_runs(run.parent) as db:
        rows = db.sql("SELECT run_id, replay_of_run, replay_of_step, replay_dropped FROM runs").fetchall()
    assert sorted(rows) == sorted([(run.name, None, None, None), (same.name, run.name, 13, 0),
                                   (without.name, run.name, 13, 2)])
    listed = {row["run_id"]: row for row in map(json.loads, run_cli("runs", "--runs-dir", str(run.parent),
                                                                     "--format", "json").stdout.splitlines())}
    assert (listed[without.name]["replay_of_run"], listed[without.name]["replay_dropped"]) == (run.name, 2)
    assert listed[run.name]["replay_of_step"] is None
    table = run_cli("runs", "--runs-dir", str(run.parent)).stdout
    assert "replay_of" in table.splitlines()[0] and f"{run.name}@13 -2" in table and f"{run.name}@13 -0" in table


def test_compare_names_the_examples_a_replay_left_out(replayed):
    run, same, without, dropped = replayed
    result = run_cli("compare", str(run), str(without))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith(f"{without.name}: the order diverges from the reference's at step 14 (15 steps "
                               "compared;") for line in lines)
    assert f"{without.name} is a replay of the reference from step 13, without 2 example(s): " \
           f"{' '.join(sorted(dropped))}" in lines
    backwards = run_cli("compare", str(without), str(run)).stdout.splitlines()
    assert f"the reference is a replay of {run.name} from step 13, without 2 example(s): " \
           f"{' '.join(sorted(dropped))}" in backwards
    rows = [json.loads(line) for line in run_cli("compare", str(run), str(without), str(same), "--section",
                                                 "data_order", "--format", "json").stdout.splitlines()]
    assert [(r["run_id"], r["replay"], r["replay_step"], r["removed_examples"], r["note"]) for r in rows] == [
        (without.name, "run is a replay of the reference", 13, sorted(dropped), ""),
        (same.name, "run is a replay of the reference", 13, [], "")]
    unrelated = run_cli("compare", str(same), str(without), "--section", "data_order", "--format", "json")
    assert json.loads(unrelated.stdout)["removed_examples"] is None
