"""The one checkpoint selection syntax of `eval --checkpoints`, `export --checkpoints` (alias `--steps`) and
`influence --checkpoints`: the parser against a run's checkpoints, its one-line errors, and the one doc line the three
help texts and the README share. Each command taking the syntax on a real run: tests/test_evaluate.py,
tests/test_export.py, tests/attribution/test_influence.py."""

import re
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

from loratrace.cli.app import _parser
from loratrace.errors import CheckpointError
from loratrace.training.selection import CHECKPOINT_SELECTION, FINAL_IS_EVAL_ONLY, choose, parse_selection, steps_text

RUN = Path("runs/r")
FOUND = [(step, RUN / "checkpoints" / f"checkpoint-step-{step:03d}.ckpt") for step in (2, 3, 4, 5, 9, 12)]


def steps(text: str, final: bool = False) -> list[int]:
    return [step for step, _ in choose(FOUND, text, RUN, "export", final=final)]


@pytest.mark.parametrize("text, expected", [
    ("all", [2, 3, 4, 5, 9, 12]), ("last", [12]), ("3", [3]), ("12,3", [3, 12]), ("3..5", [3, 4, 5]),
    ("1..4", [2, 3, 4]), ("4..10", [4, 5, 9]), ("2..3,9", [2, 3, 9]), (" 2, 4..5 ", [2, 4, 5]),
    ("3..4,last", [3, 4, 12]), ("9..9", [9]), ("3,3..4", [3, 4]),
])
def test_a_selection_takes_the_checkpoints_it_names_in_step_order(text, expected):
    assert steps(text) == expected
    chosen = choose(FOUND, text, RUN, "export")
    assert all(path.name == f"checkpoint-step-{step:03d}.ckpt" for step, path in chosen)


def test_final_selects_no_file_where_allowed_and_is_refused_elsewhere():
    assert steps("final", final=True) == []
    assert choose([], "final", RUN, "evaluate", final=True) == []  # final_model/ alone: no checkpoint needed
    with pytest.raises(CheckpointError) as caught:
        steps("final")
    assert str(caught.value) == (f"--checkpoints final: {FINAL_IS_EVAL_ONLY}; use last (the latest checkpoint), or "
                                 f"{CHECKPOINT_SELECTION}")


@pytest.mark.parametrize("text, message", [
    ("9..x", f"--checkpoints '9..x': use {CHECKPOINT_SELECTION}"),
    ("", f"--checkpoints '': use {CHECKPOINT_SELECTION}"),
    ("2,,3", f"--checkpoints '2,,3': use {CHECKPOINT_SELECTION}"),
    ("..5", f"--checkpoints '..5': use {CHECKPOINT_SELECTION}"),
    ("16,x,../1", f"--checkpoints '16,x,../1': use {CHECKPOINT_SELECTION}"),
    ("all,3", f"--checkpoints 'all,3': use {CHECKPOINT_SELECTION}"),
    ("5..3", "--checkpoints 5..3: the range is empty (write the lower step first: 3..5)"),
    ("7", "runs/r has no checkpoint at step 7 (its 6 checkpoint(s): steps 2..5,9,12)"),
    ("3,6..8", "runs/r has no checkpoint in steps 6..8 (its 6 checkpoint(s): steps 2..5,9,12)"),
])
def test_a_selection_that_cannot_be_met_is_one_line_naming_the_fix(text, message):
    with pytest.raises(CheckpointError) as caught:
        steps(text)
    assert str(caught.value) == message and "\n" not in message
    assert CheckpointError.exit_code == 2


def test_a_run_without_checkpoints_says_so_and_a_malformed_selection_is_named_first():
    with pytest.raises(CheckpointError, match=r"^runs/r has no checkpoints to evaluate$"):
        choose([], "last", RUN, "evaluate")
    with pytest.raises(CheckpointError, match=r"^--checkpoints 'x'"):
        choose([], "x", RUN, "evaluate")


def test_the_listed_steps_paste_back_as_a_selection():
    listed = steps_text([step for step, _ in FOUND])
    assert listed == "2..5,9,12" and steps(listed) == [step for step, _ in FOUND]
    assert parse_selection("1..50,100,last") == parse_selection(" 100 , 1..50, last")


def _help(*command: str) -> str:
    result = run_cli(*command, "--help")
    assert result.returncode == 0, result.stderr
    return " ".join(result.stdout.split())


def test_the_three_commands_document_the_one_syntax_as_the_readme_does():
    for command in ("eval", "export", "influence"):
        text = _help(command)
        assert "--checkpoints SELECTION" in text and CHECKPOINT_SELECTION in text, command
    assert "final (the merged final_model/)" in _help("eval")
    assert FINAL_IS_EVAL_ONLY in _help("export") and FINAL_IS_EVAL_ONLY in _help("influence")
    commands = re.search(r"## Commands\n\n```\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    assert CHECKPOINT_SELECTION in commands


def test_export_keeps_steps_as_the_older_name_of_checkpoints():
    parser = _parser()
    for flag in ("--checkpoints", "--steps"):
        args = parser.parse_args(["export", "runs/r", "--adapters", "out", flag, "3..4,last"])
        assert args.checkpoints == "3..4,last"
    assert parser.parse_args(["export", "runs/r", "--adapters", "out"]).checkpoints is None
