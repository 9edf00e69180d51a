"""No command writes into, over or around what it reads: `export --adapters`, `report -o`, `query -o`, `compare -o`
and `import-legacy --runs-dir` refuse an output that is, holds or lies inside a run folder or a runs folder (symlinks
and `..` resolved) in one line, exit 2, every file as it was. Outputs that are not regular files: `-o -` is stdout, a
FIFO or character device is written through (so is a symlink to one, /dev/stdout); a symlink to a file is refused."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import threading
from pathlib import Path

import pytest

from loratrace.cli import main


@pytest.fixture
def runs(small_run, tmp_path) -> Path:
    """tmp_path/runs/ holding two copies of the small run, R and R2 (the shared run is never at risk here)."""
    folder = tmp_path / "runs"
    for name in ("R", "R2"):
        shutil.copytree(small_run, folder / name)
    return folder


def _hashes(root: Path) -> dict[str, str | None]:
    """Every path under `root` (symlinks not followed) -> its content's hash (None for a folder, the target for a
    link): a command that writes, replaces or deletes anything changes this."""
    tree = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            tree[key] = f"-> {os.readlink(path)}"
        elif path.is_file():
            tree[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            tree[key] = None
    return tree


def _refused(args: list[str], root: Path, capsys, exit_code: int = 2) -> str:
    """Run `args`; assert `exit_code`, one error line, nothing on stdout, every file under `root` unchanged."""
    before = _hashes(root)
    code = main(args)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == exit_code and len(lines) == 1 and lines[0].startswith("loratrace: error: "), (code, captured.err)
    assert captured.out == ""
    assert _hashes(root) == before
    return lines[0]


# Each output, as a function of (tmp_path, runs folder): a file for report/query/compare, a folder for export.
CASES = {
    "equal to the run": lambda tmp, runs: runs / "R",
    "inside the run": lambda tmp, runs: runs / "R" / "run.json",
    "inside a tracking part's folder": lambda tmp, runs: runs / "R" / "tracking" / "samples.parquet",
    "containing the run": lambda tmp, runs: tmp,
    "equal to the runs folder": lambda tmp, runs: runs,
    "inside the runs folder": lambda tmp, runs: runs / "out.x",
    "inside the runs folder's other run": lambda tmp, runs: runs / "R2" / "out.x",
    "via a symlinked folder": lambda tmp, runs: _link(tmp / "link", runs / "R") / "out.x",
    "via a symlink to run.json": lambda tmp, runs: _link(tmp / "out.x", runs / "R" / "run.json"),
    "via ..": lambda tmp, runs: tmp / "elsewhere" / ".." / "runs" / "R" / "config.yaml",
}


def _link(link: Path, target: Path) -> Path:
    link.symlink_to(target)
    return link


COMMANDS = {
    "query": lambda runs, out: ["query", "SELECT 1 AS x", "--format", "csv", "--runs-dir", str(runs), "-o", out],
    "report": lambda runs, out: ["report", str(runs / "R"), "-o", out],
    "compare": lambda runs, out: ["compare", str(runs / "R"), str(runs / "R2"), "--section", "config", "-o", out],
    "export": lambda runs, out: ["export", str(runs / "R"), "--adapters", out, "--overwrite"],
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("command", COMMANDS)
def test_no_output_goes_into_over_or_around_a_run(command, case, runs, tmp_path, capsys):
    (tmp_path / "elsewhere").mkdir()
    out = CASES[case](tmp_path, runs)
    line = _refused(COMMANDS[command](runs, str(out)), tmp_path, capsys)
    assert str(out) in line


def test_export_refuses_a_folder_of_runs_it_does_not_read(runs, small_run, tmp_path, capsys):
    """--overwrite of another runs folder would delete its runs: it holds run folders."""
    line = _refused(["export", str(small_run), "--adapters", str(runs), "--overwrite"], tmp_path, capsys)
    assert line == f"loratrace: error: --adapters {runs}: {runs} holds run folders; name a path outside it"


@pytest.fixture
def legacy(tmp_path) -> Path:
    source = tmp_path / "legacy" / "exp1"
    (source / "logs").mkdir(parents=True)
    (source / "logs" / "batch_tracking_arc.jsonl").write_text('{"step": 1}\n')
    return source


@pytest.mark.parametrize("target", ["source", "inside the source", "holding the source"])
def test_import_legacy_never_writes_into_or_around_its_source(target, legacy, tmp_path, capsys):
    runs_dir = {"source": legacy, "inside the source": legacy / "runs", "holding the source": legacy.parent}[target]
    line = _refused(["import-legacy", str(legacy), "--runs-dir", str(runs_dir)], tmp_path, capsys)
    assert f"--runs-dir {runs_dir}: " in line and "which this command reads" in line


@pytest.mark.parametrize("blocker", ["a file", "a file two levels up"])
def test_export_whose_folder_cannot_be_made_is_one_line(blocker, runs, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("mine")
    out = tmp_path / "file.txt" / "adapters" if blocker == "a file" else tmp_path / "file.txt" / "a" / "b"
    line = _refused(["export", str(runs / "R"), "--adapters", str(out)], tmp_path, capsys)
    assert line == f"loratrace: error: --adapters {out}: cannot make its folder: {tmp_path / 'file.txt'} is a file"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_export_into_a_folder_without_permission_is_one_line(runs, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    line = _refused(["export", str(runs / "R"), "--adapters", str(locked / "out")], tmp_path, capsys)
    assert "permission denied" in line


def test_dash_is_stdout(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["query", "SELECT 42 AS x", "--format", "csv", "--runs-dir", str(runs), "-o", "-"]) == 0
    assert capsys.readouterr().out == "x\r\n42\r\n"
    assert not (tmp_path / "-").exists()


def test_a_fifo_is_written_through_not_replaced(runs, tmp_path):
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    received = []
    reader = threading.Thread(target=lambda: received.append(pipe.read_bytes()), daemon=True)
    reader.start()
    assert main(["query", "SELECT 42 AS x", "--format", "csv", "--runs-dir", str(runs), "-o", str(pipe)]) == 0
    reader.join(timeout=30)
    assert received == [b"x\r\n42\r\n"]
    assert stat.S_ISFIFO(os.lstat(pipe).st_mode)


def test_a_character_device_stays_a_device(runs, tmp_path):
    """A null device of the test's own (as /dev/null: major 1, minor 3), so that a failure replaces no shared file."""
    null = tmp_path / "null"
    try:
        os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("making a device node needs CAP_MKNOD")
    assert main(["query", "SELECT 42 AS x", "--runs-dir", str(runs), "-o", str(null)]) == 0
    assert stat.S_ISCHR(os.lstat(null).st_mode)


def test_a_symlink_to_a_file_is_refused_and_its_target_kept(runs, tmp_path, capsys):
    """Replacing the file a link leads to would change a file the command line never named: one line, nothing
    written, the link and its target as they were."""
    target, link = tmp_path / "elsewhere.csv", tmp_path / "out.csv"
    target.write_text("old")
    link.symlink_to(target)
    line = _refused(["query", "SELECT 42 AS x", "--format", "csv", "--runs-dir", str(runs), "-o", str(link)], tmp_path,
                    capsys)
    assert line.endswith(f"{link}: a symbolic link to a file, which would be replaced through it; name the file "
                         "itself")
    assert link.is_symlink() and os.readlink(link) == str(target) and target.read_text() == "old"


def test_dev_stdout_is_stdout_and_a_symlink_to_a_pipe_is_written_through(runs, tmp_path, capfd):
    """`-o /dev/stdout` is stdout wherever it is redirected (as with every Unix tool); a link to a FIFO writes the
    FIFO, which a reader empties."""
    assert main(["query", "SELECT 42 AS x", "--format", "csv", "--runs-dir", str(runs), "-o", "/dev/stdout"]) == 0
    assert capfd.readouterr().out == "x\r\n42\r\n"
    fifo, link = tmp_path / "pipe", tmp_path / "link"
    os.mkfifo(fifo)
    link.symlink_to(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    assert main(["query", "SELECT 42 AS x", "--format", "csv", "--runs-dir", str(runs), "-o", str(link)]) == 0
    reader.join(10)
    assert got == [b"x\r\n42\r\n"] and stat.S_ISFIFO(os.stat(fifo).st_mode) and link.is_symlink()


def test_a_folder_output_is_refused(runs, tmp_path, capsys):
    """Exit 1, as for a missing folder: an output file that cannot be written."""
    (tmp_path / "folder").mkdir()
    line = _refused(["query", "SELECT 1", "--runs-dir", str(runs), "-o", str(tmp_path / "folder")], tmp_path, capsys,
                    exit_code=1)
    assert line.endswith("is a folder; name a file")


def test_a_run_folder_the_command_does_not_name_is_still_kept(runs, small_run, tmp_path, capsys):
    """query over another runs folder, -o into runs/R: R is a run folder all the same."""
    line = _refused(["query", "SELECT 1", "--runs-dir", str(small_run.parent), "-o", str(runs / "R" / "run.json")],
                    tmp_path, capsys)
    assert f"the run folder {runs / 'R'}" in line
