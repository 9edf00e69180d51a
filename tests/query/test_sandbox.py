"""The CLI's read-only connection: every statement type DuckDB has, and every wrapper around a write, is refused in
one line with exit 1 and writes nothing anywhere; reading queries (and the runs' own files) keep working."""

from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_store import two_runs  # noqa: F401  (the fixture)

import loratrace
from loratrace.cli import main

# duckdb.StatementType -> SQL of that type, each of which must be refused. None: the parser never gives that type for
# SQL text (the wrapper list below has the SQL that stands for it). A member a later DuckDB adds fails
# test_every_statement_type_has_an_example until it is added here.
STATEMENT_TYPES = {
    "INVALID": None,
    "SELECT": "WITH gone AS (DELETE FROM runs_info RETURNING *) SELECT * FROM gone",
    "INSERT": "INSERT INTO runs_info (run_id) VALUES ('x')",
    "UPDATE": "UPDATE runs_info SET status = 'x'",
    "CREATE": "CREATE TABLE t AS SELECT * FROM batches",
    "DELETE": "DELETE FROM runs_info",
    "PREPARE": "PREPARE p AS SELECT 1",
    "EXECUTE": "EXECUTE p",
    "ALTER": "ALTER VIEW batches RENAME TO b",
    "TRANSACTION": "BEGIN TRANSACTION",
    "COPY": "COPY batches TO '{run}/tracking/batches/a000-r00-999999.parquet'",
    "ANALYZE": None,  # ANALYZE parses as VACUUM
    "VARIABLE_SET": None,  # SET VARIABLE parses as SET
    "CREATE_FUNC": None,  # CREATE FUNCTION/MACRO parse as CREATE
    "EXPLAIN": "EXPLAIN ANALYZE COPY (SELECT * FROM batches LIMIT 1) TO '{run}/tracking/batches/x.parquet'",
    "DROP": "DROP VIEW batches",
    "EXPORT": "EXPORT DATABASE '{run}/exported'",
    "PRAGMA": "PRAGMA import_database('{run}')",
    "VACUUM": "VACUUM",
    "CALL": "CALL pragma_version()",
    "SET": "SET enable_external_access = true",
    "LOAD": "INSTALL httpfs",
    "RELATION": None,  # Python relations, not SQL text
    "EXTENSION": None,  # statements of a parser extension; none is loaded
    "LOGICAL_PLAN": None,
    "ATTACH": "ATTACH '{run}/attached.duckdb' AS attached",
    "DETACH": "DETACH memory",
    "MULTI": "PIVOT batches ON step",
    "COPY_DATABASE": None,  # COPY FROM DATABASE parses as PRAGMA copy_database
    "MERGE_INTO": "MERGE INTO runs_info USING (SELECT 'A' AS run_id) s USING (run_id) WHEN MATCHED THEN DELETE",
}
WRAPPERS = [  # writes, settings and reads outside the runs, however wrapped
    "EXPLAIN ANALYZE COPY (SELECT * FROM batches LIMIT 1) TO '{run}/tracking/batches/a000-r00-000099.parquet'",
    "EXPLAIN COPY (SELECT 1) TO '{run}/x.csv'",
    "EXPLAIN (FORMAT json) COPY (SELECT 1) TO '{run}/x.csv'",
    "EXPLAIN /* a comment */ ANALYZE EXPORT DATABASE '{run}/exported'",
    "EXPLAIN ANALYZE CREATE TABLE t AS SELECT 1",
    "COPY (SELECT 1) TO '{run}/x.csv'",
    "COPY (SELECT 1) TO 'relative.csv'",
    "COPY (SELECT 1) TO '{outside}/x.csv'",
    "SELECT 1; COPY (SELECT 1) TO '{run}/x.csv'",
    "COPY (SELECT 1) TO '{run}/x.csv'; SELECT 1",
    "SELECT 1; SELECT 2",
    "WITH x AS (INSERT INTO runs_info (run_id) VALUES ('x') RETURNING *) SELECT * FROM x",
    "WITH x AS (UPDATE runs_info SET status = 'x' RETURNING *) SELECT * FROM x",
    "WITH a AS (SELECT 1), b AS (DELETE FROM runs_info RETURNING *) SELECT * FROM a",
    "EXPLAIN WITH x AS (DELETE FROM runs_info RETURNING *) SELECT * FROM x",
    "PRAGMA enable_profiling",
    "PRAGMA profiling_output = '{run}/profile.json'",
    "PRAGMA threads = 1",
    "PRAGMA enable_checkpoint_on_shutdown",
    "PRAGMA disable_optimizer",
    "IMPORT DATABASE '{run}'",
    "COPY FROM DATABASE memory TO other",
    "CALL checkpoint()",
    "CHECKPOINT",
    "FORCE CHECKPOINT",
    "EXPORT DATABASE '{outside}/exported'",
    "ATTACH ':memory:' AS scratch",
    "ATTACH '{outside}/other.duckdb' AS other",
    "USE memory",
    "INSTALL httpfs",
    "FORCE INSTALL httpfs",
    "LOAD httpfs",
    "LOAD '{run}/x.duckdb_extension'",
    "UPDATE EXTENSIONS",
    "SET enable_external_access = true",
    "SET GLOBAL allowed_directories = ['/']",
    "SET temp_directory = '{run}/spill'",
    "SET VARIABLE v = 1",
    "RESET enable_external_access",
    "CREATE MACRO m() AS 1",
    "CREATE OR REPLACE VIEW batches AS SELECT 1",
    "CREATE SECRET (TYPE s3)",
    "DEALLOCATE p",
    "TRUNCATE runs_info",
    "ANALYZE",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_text('/etc/passwd')",
    "SELECT * FROM read_blob('/etc/passwd')",
    "SELECT * FROM read_json('{outside}/data.json')",
    "SELECT * FROM glob('/etc/*')",
    "SELECT * FROM glob('{outside}/*')",
    "SELECT * FROM parquet_metadata('{outside}/data.parquet')",
    "SELECT * FROM read_parquet('{outside}/data.parquet')",
    "SELECT * FROM read_parquet('{run}/../../{outside_name}/data.parquet')",
    "SELECT * FROM sniff_csv('/etc/passwd')",
    "FROM '/etc/passwd'",
    "FROM '{outside}/data.parquet'",
    "SELECT * FROM read_csv('https://example.com/x.csv')",
    "SELECT * FROM query('COPY (SELECT 1) TO ''{run}/q.csv''')",
    "SELECT * FROM query_table('{outside}/data.parquet')",
    "SELECT * FROM read_text('{run}/link.json')",
    "SELECT * FROM read_json('{run}/link.json')",
]
READING = [  # each keeps working on the read-only connection, and writes nothing
    "SELECT count(*) FROM batches",
    "FROM samples ORDER BY step LIMIT 3",
    "SELECT count(*) FROM read_parquet('{run}/tracking/batches/*.parquet')",
    "SELECT count(*) FROM '{run}/tracking/batches/*.parquet'",
    "SELECT count(*) FROM glob('{run}/tracking/*/*')",
    "SELECT count(*) FROM parquet_metadata('{run}/tracking/attempts/a000.parquet')",
    "SELECT * FROM read_text('{run}/run.json')",
    "EXPLAIN SELECT * FROM batches",
    "EXPLAIN ANALYZE SELECT count(*) FROM samples",
    "PRAGMA show_tables",
    "PRAGMA table_info('batches')",
    "DESCRIBE batches",
    "SUMMARIZE batches",
    "SHOW TABLES",
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) SELECT * FROM r",
    "SELECT * FROM (SELECT step FROM batches) PIVOT (count(*) FOR step IN (1, 2))",
    "SELECT step FROM batches UNION ALL SELECT step FROM checkpoints",
    "SELECT 1;",
    "-- a comment\nSELECT 1 -- another",
]


@pytest.fixture
def places(two_runs, tmp_path_factory, monkeypatch):  # noqa: F811
    """The runs, and a folder outside them holding readable data; the command runs there (relative paths)."""
    outside = tmp_path_factory.mktemp("outside")
    pq.write_table(pa.table({"secret": [1]}), outside / "data.parquet")
    (outside / "data.json").write_text('{"secret": 1}\n')
    (two_runs / "A" / "link.json").symlink_to(outside / "data.json")  # inside the runs, pointing out
    monkeypatch.chdir(outside)
    return {"runs": two_runs, "run": two_runs / "A", "outside": outside, "outside_name": outside.name}


def _snapshot(*roots: Path) -> dict:
    return {str(p): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns) for root in roots
            for p in [root, *root.rglob("*")]}


def _query(places, template: str, capsys) -> tuple[int, str, str]:
    sql = template.format(**{k: str(v) for k, v in places.items()})
    before = _snapshot(places["runs"], places["outside"])
    code = main(["query", sql, "--runs-dir", str(places["runs"])])
    out, err = capsys.readouterr()
    assert _snapshot(places["runs"], places["outside"]) == before, f"{sql!r} wrote a file"
    return code, out, err


def test_every_statement_type_has_an_example():
    assert set(duckdb.StatementType.__members__) == set(STATEMENT_TYPES)


@pytest.mark.parametrize("kind", [k for k, sql in STATEMENT_TYPES.items() if sql])
def test_every_statement_type_but_reading_ones_is_refused(places, capsys, kind):
    sql = STATEMENT_TYPES[kind].format(**{k: str(v) for k, v in places.items()})
    assert [s.type.name for s in duckdb.extract_statements(sql)] == [kind]  # the example is of its type
    code, out, err = _query(places, STATEMENT_TYPES[kind], capsys)
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("loratrace: error:"), err


@pytest.mark.parametrize("template", WRAPPERS)
def test_writes_settings_and_outside_reads_are_refused_however_wrapped(places, capsys, template):
    code, out, err = _query(places, template, capsys)
    assert code == 1 and out == "", out
    assert len(err.strip().splitlines()) == 1 and err.startswith("loratrace: error:"), err
    assert "secret" not in out + err


@pytest.mark.parametrize("template", READING)
def test_reading_queries_still_run(places, capsys, template):
    code, out, err = _query(places, template, capsys)
    assert code == 0, err
    assert out.strip()


def test_the_issue_s_copy_leaves_the_batches_counted_once(places, capsys):
    sql = "EXPLAIN ANALYZE COPY (SELECT * FROM batches LIMIT 1) TO '{run}/tracking/batches/a000-r00-000077.parquet'"
    code, _, err = _query(places, sql, capsys)
    assert code == 1 and "EXPLAIN is allowed of one SELECT only" in err
    with loratrace.open_runs(places["runs"], read_only=True) as db:
        assert db.sql("SELECT count(*) FROM batches WHERE step = 1").fetchall() == [(2,)]  # A's and B's step 1


def test_the_locked_settings(places):
    with loratrace.open_runs(places["runs"], read_only=True) as db:
        settings = dict(db.sql("SELECT name, value FROM duckdb_settings() WHERE name IN ('temp_directory', "
                               "'enable_external_access', 'lock_configuration', 'autoload_known_extensions', "
                               "'python_enable_replacements')").fetchall())
    assert settings == {"temp_directory": "", "enable_external_access": "false", "lock_configuration": "true",
                        "autoload_known_extensions": "false", "python_enable_replacements": "false"}
