"""Hostile inputs to the query layer (issues #21, #27): `--runs-dir` spellings that must not widen what SQL may
read, damaged or foreign parts, runaway queries, odd result types, bytes that are not UTF-8, DuckDB's hints."""

import os
import secrets
import signal
import subprocess
import sys
import threading
import time

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_cli
from test_store import two_runs  # noqa: F401  (the fixture)

import loratrace
from loratrace.cli import main
from loratrace.query.execute import interruptible
from loratrace.query.store import QueryTimeout

# Every way a query could read a file or list a folder; {parent} holds the secret, {runs} is the runs folder.
PROBES = [
    "SELECT * FROM read_text('secret.txt')",
    "SELECT * FROM read_text('{parent}/secret.txt')",
    "SELECT * FROM read_text('{runs}/../secret.txt')",
    "SELECT * FROM read_text('{runs}/A/../../secret.txt')",
    "SELECT * FROM read_text('file://{parent}/secret.txt')",
    "SELECT * FROM read_csv('{parent}/secret.txt')",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_blob('{parent}/secret.txt')",
    "SELECT * FROM read_blob('{parent}/*')",
    "SELECT * FROM glob('{parent}/*')",
    "SELECT * FROM glob('*')",
    "SELECT * FROM glob('{runs}/../*')",
    "SELECT * FROM glob('/*')",
    "SELECT * FROM read_parquet('{parent}/secret.parquet')",
    "SELECT * FROM read_parquet('{parent}/**/*.parquet')",
    "SELECT * FROM parquet_metadata('{parent}/secret.parquet')",
    "SELECT * FROM '{parent}/secret.parquet'",
    "COPY (SELECT 1) TO '{parent}/x.csv'",
    "ATTACH '{parent}/secret.duckdb' AS s",
    "INSTALL httpfs",
    "LOAD httpfs",
]


@pytest.fixture
def lab(two_runs, tmp_path_factory, monkeypatch):  # noqa: F811
    """A parent folder holding a secret (a random token in a text file, a Parquet file and a DuckDB file, and one in
    a file name that only a listing shows) and the runs folder; the command runs in the parent."""
    parent = tmp_path_factory.mktemp("lab") / "project"
    parent.mkdir()
    token, listed = secrets.token_hex(8), secrets.token_hex(8)
    (parent / "secret.txt").write_text(f"token,{token}\n")
    pq.write_table(pa.table({"token": [token]}), parent / "secret.parquet")
    with duckdb.connect(str(parent / "secret.duckdb")) as con:
        con.execute(f"CREATE TABLE t AS SELECT '{token}' AS token")
    (parent / f"listed-{listed}.txt").write_text("x")
    two_runs.rename(parent / "runs")
    (parent / "link").symlink_to(parent / "runs")
    monkeypatch.chdir(parent)
    return {"parent": parent, "runs": parent / "runs", "token": token, "listed": listed}


def _spellings(parent):
    runs = parent / "runs"
    first, *rest = runs.parts[1:]
    return ["runs", "runs/", "runs//", "./runs", "runs/../runs", "run*", "r?ns", "[r]uns", "runs/*", "link", "link/",
            str(runs), f"{runs}/", f"{parent}/../{parent.name}/runs", f"file://{runs}", f"{parent.parent}/*/runs",
            f"{parent.parent}/pro*/runs", "/" + "/".join([first[:2] + "*", *rest]), f"/*/{'/'.join(rest)}",
            f"{parent}/r*", f"{parent}/[r]uns"]


def test_no_runs_dir_spelling_lets_a_query_read_outside_the_runs(lab, capsys):
    for spelling in _spellings(lab["parent"]):
        assert main(["query", "SELECT count(*) AS n FROM batches", "--runs-dir", spelling]) == 0, spelling
        assert capsys.readouterr().out.split() == ["n", "7"], spelling  # the spelling names the runs
        for probe in PROBES:
            code = main(["query", probe.format(**lab), "--runs-dir", spelling])
            out, err = capsys.readouterr()
            assert code == 1 and out == "", (spelling, probe, out)
            assert lab["token"] not in out + err and lab["listed"] not in out + err, (spelling, probe)
            assert len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in lab["parent"].iterdir())[-1] == "secret.txt"  # nothing was written there


def test_sql_on_stdin_that_is_not_utf8_is_one_line(two_runs):  # noqa: F811
    for sql, where in ((b"SELECT \xff\xfe 1", "byte 0xff at character 8"),
                       (b"SELECT 'caf\xe9'", "byte 0xe9 at character 12")):
        result = subprocess.run([sys.executable, "-m", "loratrace", "query", "-", "--runs-dir", str(two_runs)],
                                input=sql, capture_output=True, timeout=120)
        assert result.returncode == 2 and result.stdout == b""
        assert result.stderr.decode().splitlines() == [
            f"loratrace: error: the SQL is not UTF-8 text ({where}): save it as UTF-8"]


@pytest.mark.parametrize(("sql", "shown"), [
    ("SELECT * FROM batchs", 'Table with name batchs does not exist! Did you mean "batches"?'),
    ("SELECT stpe FROM batches", 'Referenced column "stpe" not found in FROM clause! Candidate bindings: "step"'),
    ("SELECT step FROM batches b, checkpoints c", "Ambiguous reference to column name \"step\""),
    ("SELECT 1,\n  2 +", "Parser Error: syntax error at or near \"+\"; LINE 2:   2 + (at '+')"),
    ("SELECT CAST('x' AS INT)", "Could not convert string 'x' to INT32; LINE 1: SELECT CAST('x' AS INT) "
                                "(at \"CAST('x' AS INT)\")"),
])
def test_duckdb_s_hints_are_kept_on_the_one_line(two_runs, capsys, sql, shown):  # noqa: F811
    assert main(["query", sql, "--runs-dir", str(two_runs)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1
    assert err.startswith("loratrace: error: SQL error: ") and shown in err, err


def test_trace_of_a_run_trained_without_tracking_says_so(tmp_path, capsys):
    run = tmp_path / "arc-challenge_lora_20250720_143052"
    run.mkdir()
    (run / "run.json").write_text('{"run_id": "arc-challenge_lora_20250720_143052", "status": "completed"}')
    (run / "config.yaml").write_text("tracking:\n  enabled: false\n  flush_every_steps: 50\n")
    for extra in ([], ["--run", run.name]):
        assert main(["trace", "--example-id", "LTSYN_TRA_0001", "--runs-dir", str(tmp_path), *extra]) == 1
        assert capsys.readouterr().err == (
            f"loratrace: error: run {run.name} was trained without batch tracking, so no example can be traced in "
            "it: train with --track-batches (tracking.enabled=true) to record which examples each step trained on\n")


def test_trace_names_the_untracked_run_asked_for_beside_tracked_ones(two_runs, capsys):  # noqa: F811
    (two_runs / "C").mkdir()
    (two_runs / "C" / "run.json").write_text('{"run_id": "C"}')
    (two_runs / "C" / "config.yaml").write_text("tracking:\n  enabled: false\n")
    assert main(["trace", "--example-id", "y", "--run", "C", "--runs-dir", str(two_runs)]) == 1
    assert "run C was trained without batch tracking" in capsys.readouterr().err


def _garble_pages(path):
    """Garbage over every byte between the magic number and the footer: the footer reads, the pages do not."""
    data = bytearray(path.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little")
    data[4:len(data) - 8 - footer] = bytes((n * 37 + 11) & 0xFF for n in range(4, len(data) - 8 - footer))
    path.write_bytes(bytes(data))
    pq.read_metadata(path)  # the footer still reads


def _b_part(runs):
    [part] = (runs / "B" / "tracking" / "batches").iterdir()
    return part


def _only_a(runs, part, why):
    """A query and a trace over the runs answer from run A alone, with one warning line naming B's part."""
    result = run_cli("query", "SELECT run_id, count(*) AS n, sum(loss) AS loss FROM batches GROUP BY 1", "--format",
                     "csv", "--runs-dir", str(runs), timeout=120)
    assert result.returncode == 0 and result.stdout.splitlines() == ["run_id,n,loss", "A,5,15.0"], result.stderr
    [warning] = result.stderr.splitlines()
    assert warning.startswith(f"loratrace: warning: skipping {why} {part}")
    result = run_cli("trace", "--example-id", "y", "--format", "csv", "--runs-dir", str(runs), timeout=120)
    assert result.returncode == 0 and [line.split(",")[0] for line in result.stdout.splitlines()[1:]] == ["A"] * 5
    assert result.stderr.splitlines() == [warning]
    return warning


def test_a_part_linked_from_outside_the_run_is_skipped_with_one_warning(two_runs, tmp_path_factory):  # noqa: F811
    part = _b_part(two_runs)
    outside = tmp_path_factory.mktemp("elsewhere") / part.name
    part.rename(outside)
    part.symlink_to(outside)
    assert _only_a(two_runs, part, "tracking part").endswith(f"a link to {outside}, outside its run folder")


def test_a_part_with_damaged_pages_is_skipped_with_one_warning(two_runs):  # noqa: F811
    part = _b_part(two_runs)
    _garble_pages(part)
    _only_a(two_runs, part, "damaged tracking part")
    with pytest.warns(UserWarning, match=f"skipping damaged tracking part {part}"):
        with loratrace.open_runs(two_runs) as db:  # the Python API too, and its later queries
            assert db.fetch_table("SELECT count(*) AS n FROM samples").to_pylist() == [{"n": 10}]  # A: 5 batches of 2
            assert db.fetch_table("SELECT max(step) AS s FROM batches").to_pylist() == [{"s": 5}]


RUNAWAY = "SELECT count(*) FROM range(1000000000) a, range(1000000000) b WHERE a.range + b.range = -1"


def test_query_timeout_stops_a_runaway_query(two_runs):  # noqa: F811
    started = time.monotonic()
    result = run_cli("query", "--timeout", "1", RUNAWAY, "--runs-dir", str(two_runs), timeout=120)
    assert time.monotonic() - started < 60
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == ("loratrace: error: the query ran past its time limit of 1 s and was stopped "
                             "(--timeout)\n")
    with loratrace.open_runs(two_runs, read_only=True) as db:  # the Python API, and the connection afterwards
        with pytest.raises(QueryTimeout, match="time limit of 0.5 s"):
            db.fetch_table(RUNAWAY, timeout=0.5)
        assert db.fetch_table("SELECT count(*) AS n FROM batches", timeout=30).to_pylist() == [{"n": 7}]


def test_ctrl_c_stops_a_running_query_at_once(two_runs):  # noqa: F811
    command = [sys.executable, "-m", "loratrace", "query", RUNAWAY, "--runs-dir", str(two_runs)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        time.sleep(6)  # started, and into the query
        process.send_signal(signal.SIGINT)
        try:
            out, err = process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            raise AssertionError("Ctrl+C did not stop the query") from None
    assert process.returncode == 130 and out == "" and err == "loratrace: error: interrupted\n"


def test_ctrl_c_stops_a_python_api_query_and_the_connection_still_answers(two_runs):  # noqa: F811
    with loratrace.open_runs(two_runs) as db:
        timer = threading.Timer(1.0, os.kill, [os.getpid(), signal.SIGINT])
        timer.start()
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            db.fetch_table(RUNAWAY)
        assert time.monotonic() - started < 10
        assert db.fetch_table("SELECT count(*) AS n FROM batches").to_pylist() == [{"n": 7}]


def test_ctrl_c_before_the_query_starts_running_is_not_lost():
    """Ctrl+C while the worker is still getting ready (listing parts, binding): DuckDB's interrupt is lost when no
    query runs yet, so it is sent again until the worker ends (a watchdog ends a lost one after 20 s)."""
    con = duckdb.connect()

    def compute():
        time.sleep(0.5)  # getting ready: no query running when Ctrl+C comes
        return con.sql(RUNAWAY).fetchall()

    timer, watchdog = threading.Timer(0.1, os.kill, [os.getpid(), signal.SIGINT]), threading.Timer(20, con.interrupt)
    timer.start()
    watchdog.start()
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            interruptible(con, compute, None)
    finally:
        watchdog.cancel()
    assert time.monotonic() - started < 5
    assert con.sql("SELECT 42").fetchall() == [(42,)]  # the connection still answers


def test_a_run_folder_linked_into_the_runs_folder_is_still_read(two_runs, tmp_path_factory, capsys):  # noqa: F811
    elsewhere = tmp_path_factory.mktemp("other-disk") / "B"
    (two_runs / "B").rename(elsewhere)
    (two_runs / "B").symlink_to(elsewhere)
    assert main(["query", "SELECT run_id, count(*) AS n FROM batches GROUP BY 1 ORDER BY 1", "--format", "csv",
                 "--runs-dir", str(two_runs)]) == 0
    assert capsys.readouterr().out.splitlines() == ["run_id,n", "A,5", "B,2"]
