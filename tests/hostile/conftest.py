"""The hostile-input suite's machinery (issue #27): a small world of runs built once, one copy of it per case, the
command run as a user runs it, and a verdict on the rule by itself.

The rule, for every command and every input: the right result, or exit != 0 with one line on stderr
(`loratrace: error: ...`) naming the file, line or key at fault; never a traceback; a command that fails changes
nothing on disk; a reader never writes; nothing outside the runs folder and the named output is read or written.

A case's world (one per case, under its tmp_path):

    case/runs/<tracked>/ <untracked>/    copies of the session's two runs (tests/conftest.py's SMALL config)
    case/legacy/icoding/...              a copy of a legacy folder (tests/legacy_script.py)
    case/sentinel-<NAME>.txt             holds CONTENT: outside the runs folder, never to be read
    case/out/                            where named outputs go
    case/tmp/                            the command's TMPDIR

Every file under case/ is hashed before and after; the verdict (`judge`) is one of OUTCOMES. Every verdict is kept
for the session-end summary line (`pytest_terminal_summary`).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# Worst first: a case's verdict is the worst class it shows.
OUTCOMES = ("hang", "outside", "traceback", "changed", "wrong", "clean")
VERDICTS: list[Verdict] = []  # every case's verdict this session, for the summary


@dataclass(frozen=True)
class Pristine:
    """The session's world, never touched by a case: two runs and a legacy folder, and facts read from them."""

    root: Path
    tracked: str  # run folder names under root/runs
    untracked: str
    legacy: Path  # relative to root
    facts: dict


@dataclass
class World:
    """One case's copy of the world, its sentinel and the paths its command lines name."""

    root: Path
    tracked: str
    untracked: str
    legacy_rel: Path
    facts: dict
    name_token: str  # in the sentinel's file name: may show only where the command line names it
    content_token: str  # in the sentinel's content: must never show anywhere

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def T(self) -> Path:  # noqa: N802 - the tracked run, as the case tables write it
        return self.runs / self.tracked

    @property
    def U(self) -> Path:  # noqa: N802
        return self.runs / self.untracked

    @property
    def legacy(self) -> Path:
        return self.root / self.legacy_rel

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def sentinel(self) -> Path:
        return self.root / f"sentinel-{self.name_token}.txt"

    def fill(self, text: str) -> str:
        """A case table's placeholders ({runs}, {T}, {U}, {legacy}, {out}, {case}, {sentinel}) made paths; other
        braces (JSON, SQL) stay as they are."""
        for key, value in (("{runs}", self.runs), ("{T}", self.T), ("{U}", self.U), ("{legacy}", self.legacy),
                           ("{out}", self.out), ("{case}", self.root), ("{sentinel}", self.sentinel)):
            text = text.replace(key, str(value))
        return text


@dataclass
class Result:
    argv: list[str]
    rc: int | None  # None: timed out
    stdout: str
    stderr: str
    changed: set[str]  # paths under case/ (relative) added, removed or modified
    wall_s: float = 0.0

    @property
    def error_lines(self) -> list[str]:
        """stderr's lines but the one-line warnings (`loratrace: warning: ...`)."""
        return [line for line in self.stderr.splitlines() if line.strip() and
                not line.startswith("loratrace: warning:")]

    @property
    def first_stderr_line(self) -> str:
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return lines[0] if lines else ""


@dataclass
class Verdict:
    case_id: str
    outcome: str
    command: str
    first_stderr_line: str
    reasons: list[str] = field(default_factory=list)
    last_stderr_line: str = ""  # a traceback's exception, or the line after a progress bar


# ------------------------------------------------------------------------------------------------ the world, once

@pytest.fixture(scope="session")
def pristine(small_run, legacy_folder, tmp_path_factory) -> Pristine:
    """A tracked 16-step run (a copy of the session's small run), an untracked 4-step run and a legacy folder (a copy
    of the session's): built once."""
    from conftest import small_config

    import loratrace

    root = tmp_path_factory.mktemp("hostile-world")
    runs = root / "runs"
    tracked = runs / small_run.name
    shutil.copytree(small_run, tracked, symlinks=True)
    config = tracked / "config.yaml"  # its runs_dir: this world's, as if trained here
    config.write_text(config.read_text().replace(str(small_run.parent), str(runs)))
    untracked = loratrace.train(small_config(runs, "tracking.enabled=false", "training.max_steps=4",
                                             "training.stage1_steps=2"), progress=False)
    assert tracked != untracked
    experiments = legacy_folder.parents[2]  # experiments/<project>/<dataset>/<run>: the whole tree, as written
    shutil.copytree(experiments, root / "legacy", symlinks=True)
    legacy = root / "legacy" / legacy_folder.relative_to(experiments)
    return Pristine(root, tracked.name, untracked.name, legacy.relative_to(root), _facts(tracked, untracked))


def _facts(tracked: Path, untracked: Path) -> dict:
    """What the right results are, read with pyarrow straight from the tracker's parts (not through loratrace)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    batches = pq.read_table(sorted((tracked / "tracking" / "batches").glob("*.parquet")))
    example = batches.column("example_ids")[0][0].as_py()
    steps = sorted(row["step"] for row in batches.select(["step", "example_ids"]).to_pylist()
                   if example in row["example_ids"])
    return {"tracked_id": tracked.name, "untracked_id": untracked.name, "rows": batches.num_rows,
            "sum_step": pc.sum(batches.column("step")).as_py(), "example": example, "example_steps": steps,
            "last_step": pc.max(batches.column("step")).as_py()}


@pytest.fixture
def world(pristine: Pristine, tmp_path: Path) -> World:
    """A fresh copy of the world for one case, with its sentinel beside the runs folder."""
    return make_world(pristine, tmp_path / "case")


def make_world(pristine: Pristine, root: Path) -> World:
    shutil.copytree(pristine.root, root, symlinks=True)
    for name in ("out", "tmp"):
        (root / name).mkdir()
    w = World(root, pristine.tracked, pristine.untracked, pristine.legacy, pristine.facts,
              name_token=secrets.token_hex(8), content_token=f"SENTINEL{secrets.token_hex(16)}")
    w.sentinel.write_text(f"{w.content_token}\n")
    return w


# ------------------------------------------------------------------------------------------------ running a command

def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under `root`: a file's sha256, a link's target, a folder, or another kind (a device, a fifo)."""
    entries = {}
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            path = Path(folder, name)
            rel = str(path.relative_to(root))
            st = path.lstat()
            if path.is_symlink():
                entries[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                entries[rel] = ("dir",)
            elif path.is_file():
                entries[rel] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
            else:
                entries[rel] = ("other", st.st_mode)
    return entries


def changed_paths(before: dict, after: dict) -> set[str]:
    return {path for path in before.keys() | after.keys() if before.get(path) != after.get(path)}


def run_command(w: World, argv: list[str], stdin: bytes | None = None, timeout: float = 120,
                cwd: Path | None = None) -> Result:
    """`python -m loratrace ARGV` in the case's folder, bounded by `timeout` (its whole process group is killed
    then), with the case's tmp/ as TMPDIR and one thread per library (the machine is shared)."""
    import time

    env = {**os.environ, "TMPDIR": str(w.root / "tmp"), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONDONTWRITEBYTECODE": "1"}
    before = snapshot(w.root)
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "loratrace", *argv], cwd=cwd or w.root, env=env,
                            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        rc = None
    wall = time.monotonic() - start
    return Result(argv, rc, out.decode(errors="replace"), err.decode(errors="replace"),
                  changed_paths(before, snapshot(w.root)), wall)


# ------------------------------------------------------------------------------------------------ the verdict

def judge(w: World, result: Result, *, expect: str = "either", names: tuple[str, ...] = (), check=None,
          writes_runs: bool = False, outputs: tuple[str, ...] = (), cwd: Path | None = None) -> tuple[str, list[str]]:
    """The rule, applied to one command's result: (outcome, reasons).

    expect: "ok" (must succeed), "fail" (must fail) or "either". names: on failure the error line must contain one
    of them (the file, line or key at fault). check(result, world) -> reason or None: the result, when it succeeded.
    writes_runs: on success the command may change files under runs/ (train, eval, influence, import-legacy, sweep).
    outputs: the named outputs (paths, filled; a relative one from `cwd`, default the case folder): on success they,
    and anything under them, may change.
    """
    reasons: dict[str, list[str]] = {name: [] for name in OUTCOMES}
    if result.rc is None:
        reasons["hang"].append("timed out")
    ok = result.rc == 0
    _judge_leaks(w, result, ok, writes_runs, [Path(cwd or w.root, o) for o in outputs], reasons)
    if "Traceback" in result.stderr:
        reasons["traceback"].append("a traceback on stderr")
    elif result.rc is not None and result.rc < 0:
        reasons["traceback"].append(f"killed by signal {-result.rc}")
    elif result.rc not in (0, None):
        lines = result.error_lines
        if len(lines) != 1:
            reasons["traceback"].append(f"{len(lines)} error lines on stderr, not one")
        elif not lines[0].startswith("loratrace: error: "):
            reasons["traceback"].append("the error line is not `loratrace: error: ...`")
    if result.rc is not None:
        _judge_result(w, result, ok, expect, names, check, reasons["wrong"])
    outcome = next((name for name in OUTCOMES if reasons[name]), "clean")
    return outcome, [f"{name}: {text}" for name in OUTCOMES for text in _few(reasons[name])]


def _few(texts: list[str], most: int = 4) -> list[str]:
    """A long list of changed files as its first few and a count: a whole run deleted is one line of the summary."""
    return texts if len(texts) <= most else [*texts[:most], f"... and {len(texts) - most} more"]


def _judge_leaks(w: World, result: Result, ok: bool, writes_runs: bool, outputs: list[Path],
                 reasons: dict[str, list[str]]) -> None:
    """Changed files and the sentinel: `changed` inside runs/ or legacy/, `outside` anywhere else."""
    named = [os.path.relpath(o, w.root) for o in outputs]
    for rel in sorted(result.changed):
        under_output = any(rel == o or rel.startswith(o.rstrip("/") + "/") for o in named)
        if rel.startswith("legacy"):
            reasons["changed"].append(f"the legacy source changed: {rel}")
        elif rel.startswith("runs"):
            if not ok:
                reasons["changed"].append(f"a failing command changed {rel}")
            elif not writes_runs:
                reasons["changed"].append(f"a reader changed {rel}")
        elif under_output:
            if not ok:
                reasons["changed"].append(f"a failing command changed its output {rel}")
        else:
            reasons["outside"].append(f"written outside the runs folder and the named output: {rel}")
    said = " ".join(result.argv)
    written = [w.root / rel for rel in result.changed if (w.root / rel).is_file() and not (w.root / rel).is_symlink()]
    texts = [("stdout", result.stdout), ("stderr", result.stderr)] + \
            [(str(p.relative_to(w.root)), p.read_bytes().decode(errors="replace")) for p in written]
    for where, text in texts:
        if w.content_token in text:
            reasons["outside"].append(f"the sentinel's content in {where}")
        elif w.name_token in text and w.name_token not in said:
            reasons["outside"].append(f"the sentinel's file name in {where}")


def _judge_result(w: World, result: Result, ok: bool, expect: str, names, check, wrong: list[str]) -> None:
    if expect == "ok" and not ok:
        wrong.append(f"failed where it must succeed: {result.first_stderr_line}")
    elif expect == "fail" and ok:
        wrong.append("succeeded where it must fail")
    if not ok and names and result.error_lines:  # the error line, or a warning line before it, names the fault
        said = result.error_lines[-1:] + [line for line in result.stderr.splitlines()
                                          if line.startswith("loratrace: warning:")]
        if not any(name in line for line in said for name in names):
            wrong.append(f"the error line names none of {', '.join(names)}")
    if ok and check is not None:
        reason = check(result, w)
        if reason:
            wrong.append(reason)


def record(case_id: str, w: World, result: Result, outcome: str, reasons: list[str]) -> Verdict:
    command = "loratrace " + " ".join(_quoted(a) for a in result.argv)
    lines = [line for line in result.stderr.splitlines() if line.strip(" ^~\t")]  # not 3.11's caret lines
    last = lines[-1].replace(str(w.root), "$CASE")[-200:] if len(lines) > 1 else ""
    return keep(Verdict(case_id, outcome, command.replace(str(w.root), "$CASE"),
                        result.first_stderr_line.replace(str(w.root), "$CASE")[:200], reasons, last))


def keep(verdict: Verdict) -> Verdict:
    """A verdict into the session summary (and HOSTILE_REPORT, a JSON Lines file, when set)."""
    VERDICTS.append(verdict)
    path = os.environ.get("HOSTILE_REPORT")
    if path:  # one JSON line per case as it ends: a lead comparing branches, or reading a run still going
        with open(path, "a") as file:
            file.write(json.dumps(verdict.__dict__) + "\n")
    return verdict


def _quoted(arg: str) -> str:
    import shlex

    return shlex.quote(arg) if len(arg) < 200 else shlex.quote(arg[:200] + "...")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not VERDICTS:
        return
    counts = {name: sum(v.outcome == name for v in VERDICTS) for name in OUTCOMES}
    line = (f"hostile: {len(VERDICTS)} cases, {counts['clean']} clean, {counts['traceback']} tracebacks, "
            f"{counts['wrong']} wrong, {counts['changed']} changed, {counts['outside']} outside, "
            f"{counts['hang']} hangs")
    terminalreporter.section("hostile inputs")
    terminalreporter.write_line(line)
    for verdict in VERDICTS:
        if verdict.outcome != "clean":
            terminalreporter.write_line(f"  [{verdict.outcome}] {verdict.case_id}: {verdict.command}")
            terminalreporter.write_line(f"      stderr: {verdict.first_stderr_line or '(none)'}")
            if verdict.last_stderr_line:
                terminalreporter.write_line(f"      last stderr line: {verdict.last_stderr_line}")
            terminalreporter.write_line(f"      why: {'; '.join(verdict.reasons)[:300]}")


def pytest_collection_modifyitems(config, items):
    """The quick subset by default (CI included): the rest of the cross product (about 200 cases, 15-35 minutes on
    two cores, past CI's budget) runs when a -m expression names it (`-m hostile_full`)."""
    if "hostile_full" in (config.option.markexpr or ""):
        return
    keep = [item for item in items if not item.get_closest_marker("hostile_full")]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in keep])
        items[:] = keep
