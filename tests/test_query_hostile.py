"""Hostile inputs to the query layer (issues #21, #27): `--runs-dir` spellings that must not widen what SQL may
read, damaged or foreign parts, runaway queries, odd result types, bytes that are not UTF-8, DuckDB's hints."""

import secrets
import subprocess
import sys

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_store import two_runs  # noqa: F401  (the fixture)

from loratrace.cli import main

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
