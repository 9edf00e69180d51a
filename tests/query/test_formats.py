"""`loratrace query --format csv|json|parquet` give back every value, read with real readers (pandas, DuckDB,
pyarrow, json)."""

import datetime as dt
import json
import math

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import run_cli

import loratrace

VALUES = """
SELECT * FROM (VALUES
    (1, [1.5, NULL, 'nan'::FLOAT, 0.1, '-inf'::FLOAT]::FLOAT[], range(1500),
     TIMESTAMPTZ '2025-07-20 01:02:03.123456+00',
     0.1::FLOAT, 0.1::DOUBLE, 'a,b "q"' || chr(10) || 'new line', '', ['x', NULL, 'y,"z"', ''], true, 1e300::DOUBLE,
     'NULL', 9007199254740993::BIGINT),
    (2, NULL, [], NULL, NULL, NULL, NULL, NULL, NULL, NULL, 'nan'::DOUBLE, NULL, NULL)
) t(id, f32s, long_list, ts, f32, f64, s, empty, strs, b, special, null_word, big_int)
"""


def _same(a, b) -> bool:
    """Equal, NaN equal to NaN, at any depth."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("no-runs")


@pytest.fixture(scope="module")
def reference(runs):
    with loratrace.open_runs(runs) as db:
        return db.sql(VALUES).to_arrow_table()


def test_parquet_round_trips(runs, reference, tmp_path):
    out = tmp_path / "values.parquet"
    assert run_cli("query", VALUES, "--format", "parquet", "-o", str(out), "--runs-dir", str(runs)).returncode == 0
    table = pq.read_table(out)
    assert [str(t).replace("element", "l") for t in table.schema.types] == [str(t) for t in reference.schema.types]
    assert all(_same(list(a.values()), list(b.values())) for a, b in zip(table.to_pylist(), reference.to_pylist()))


def test_json_lines_round_trip(runs, reference):
    result = run_cli("query", VALUES, "--format", "json", "--runs-dir", str(runs))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]  # JSON Lines: one object per row
    expected = reference.to_pylist()
    assert [list(r) for r in rows] == [reference.column_names] * 2
    for got, want in zip(rows, expected):
        for column, value in want.items():
            if isinstance(value, dt.datetime):
                assert dt.datetime.fromisoformat(got[column]) == value
            else:
                assert _same(got[column], value), (column, got[column], value)
    assert rows[0]["f32"] == float(np.float32(0.1)) and len(rows[0]["long_list"]) == 1500
    assert rows[0]["f32s"][1] is None and rows[0]["strs"][1] is None and rows[1]["f32s"] is None
    read_back = duckdb.read_json(_text_file(result.stdout, "values.jsonl", runs)).to_arrow_table().to_pylist()
    assert _same(read_back[0]["f32s"], expected[0]["f32s"]) and read_back[0]["long_list"] == list(range(1500))


def test_csv_round_trips(runs, reference, tmp_path):
    out = tmp_path / "values.csv"
    result = run_cli("query", VALUES, "--format", "csv", "-o", str(out), "--runs-dir", str(runs))
    assert result.returncode == 0, result.stderr
    expected = reference.to_pylist()
    texts = pd.read_csv(out, keep_default_na=False, na_values=[""])  # else pandas reads the text NULL as missing
    assert texts.s[0] == "a,b \"q\"\nnew line" and texts.null_word[0] == "NULL" and pd.isna(texts.s[1])
    frame = pd.read_csv(out, dtype={"big_int": "Int64"})
    assert frame.f32[0] == float(np.float32(0.1)) and frame.f64[0] == 0.1 and frame.special[0] == 1e300
    assert math.isnan(frame.special[1]) and int(frame.big_int[0]) == 9007199254740993
    assert pd.Timestamp(frame.ts[0]) == pd.Timestamp(expected[0]["ts"]) and pd.isna(frame.ts[1])
    for column in ("f32s", "long_list", "strs"):  # lists are JSON text
        assert _same(json.loads(frame[column][0]), expected[0][column]), column
    assert json.loads(frame.long_list[1]) == []
    read_back = duckdb.sql(f"SELECT * FROM read_csv('{out}', allow_quoted_nulls = false)").fetchall()
    assert read_back[0][7] == "" and read_back[1][7] is None  # the empty string and NULL stay apart
    assert read_back[0][3] == expected[0]["ts"] and read_back[0][6] == expected[0]["s"]
    assert read_back[0][0] == 1 and read_back[0][9] is True and read_back[0][12] == 9007199254740993


def test_views_round_trip_through_json_and_csv(small_run, tmp_path):
    runs = str(small_run.parent)
    sql = "SELECT run_id, step, example_ids, losses, p_gold, correct, loss, lr, wall_time FROM batches ORDER BY step"
    with loratrace.open_runs(small_run.parent) as db:
        expected = db.sql(sql).to_arrow_table().to_pylist()
    rows = [json.loads(line) for line in run_cli("query", sql, "--format", "json", "--runs-dir", runs).stdout
            .splitlines()]
    assert len(rows) == len(expected) == 16
    for got, want in zip(rows, expected):
        assert dt.datetime.fromisoformat(got.pop("wall_time")) == want.pop("wall_time")
        assert got == want
    out = tmp_path / "batches.csv"
    assert run_cli("query", sql, "--format", "csv", "-o", str(out), "--runs-dir", runs).returncode == 0
    frame = pd.read_csv(out, dtype={"big_int": "Int64"})
    assert [json.loads(x) for x in frame.losses] == [w["losses"] for w in expected]
    assert frame.loss.tolist() == [w["loss"] for w in expected]  # float32 written as its exact double


def _text_file(text: str, name: str, folder) -> str:
    path = folder / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("fmt", ["table", "csv", "json", "parquet"])
def test_repeated_column_names_are_one_line_and_write_nothing(small_run, tmp_path, fmt):
    out = tmp_path / "out"
    result = run_cli("query", "SELECT 1 AS a, 2 AS a, [1, NULL] AS l", "--format", fmt, "--output", str(out),
                     "--runs-dir", str(small_run.parent))
    assert result.returncode == 1 and not out.exists()
    assert result.stderr.strip() == ("loratrace: error: the result has more than one column named 'a': name them "
                                     "apart with AS (e.g. SELECT b.step AS batch_step, c.step AS checkpoint_step ...)")


# Every DuckDB type a query can give, at its edges, with NULLs at each depth; each column's DuckDB type, for reading
# the text back.
EVERY_TYPE = {
    "hugeint": ("HUGEINT", ["sum(x)::HUGEINT", "170141183460469231731687303715884105727::HUGEINT",
                            "-170141183460469231731687303715884105727::HUGEINT - 1", "NULL"]),
    "uhugeint": ("UHUGEINT", ["170141183460469231731687303715884105727::UHUGEINT", "0::UHUGEINT", "7::UHUGEINT",
                              "NULL"]),
    "dec": ("DECIMAL(10,2)", ["1.5::DECIMAL(10,2)", "-0.01::DECIMAL(10,2)", "0::DECIMAL(10,2)", "NULL"]),
    "dec38": ("DECIMAL(38,10)", ["'1234567890123456789012345678.0123456789'::DECIMAL(38,10)",
                                 "'-0.0000000001'::DECIMAL(38,10)", "0::DECIMAL(38,10)", "NULL"]),
    "interval": ("INTERVAL", ["INTERVAL '14 months 3 days 04:05:06.000007'", "-INTERVAL '1 month 2 days 1 second'",
                              "INTERVAL '0 seconds'", "NULL"]),
    "uuid": ("UUID", ["'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::UUID", "'00000000-0000-0000-0000-000000000000'::UUID",
                      "'ffffffff-ffff-ffff-ffff-ffffffffffff'::UUID", "NULL"]),
    "blob": ("BLOB", ["'\\x00\\xff,\"\\x0a'::BLOB", "''::BLOB", "'abc'::BLOB", "NULL"]),
    "time": ("TIME", ["TIME '12:34:56.789012'", "TIME '00:00:00'", "TIME '23:59:59.999999'", "NULL"]),
    "tstz": ("TIMESTAMPTZ", ["TIMESTAMPTZ '2025-07-20 01:02:03.123456+02'", "TIMESTAMPTZ '1970-01-01 00:00:00+00'",
                             "TIMESTAMPTZ '0001-01-01 00:00:00+00'", "NULL"]),
    "ts": ("TIMESTAMP", ["TIMESTAMP '2025-07-20 01:02:03.000001'", "TIMESTAMP '9999-12-31 23:59:59'",
                         "TIMESTAMP '1969-12-31 23:59:59.5'", "NULL"]),
    "date": ("DATE", ["DATE '2025-07-20'", "DATE '0001-01-01'", "DATE '9999-12-31'", "NULL"]),
    "map": ("MAP(VARCHAR, INTEGER)", ["MAP {'a': 1, 'b,\"': NULL}", "MAP {}::MAP(VARCHAR, INTEGER)",
                                      "MAP {'': 0}", "NULL"]),
    "lists": ("DECIMAL(38,2)[][]", ["[[1.25::DECIMAL(38,2), NULL], NULL, []]", "[]::DECIMAL(38,2)[][]",
                                    "[NULL]::DECIMAL(38,2)[][]", "NULL"]),
    "struct": ("STRUCT(\"a\" HUGEINT, \"b\" VARCHAR[], \"c\" STRUCT(\"d\" DOUBLE))",
               ["{'a': 12::HUGEINT, 'b': ['x', NULL], 'c': {'d': 0.1}}",
                "{'a': NULL, 'b': NULL, 'c': NULL}::STRUCT(a HUGEINT, b VARCHAR[], c STRUCT(d DOUBLE))",
                "{'a': -1::HUGEINT, 'b': [], 'c': {'d': NULL}}", "NULL"]),
    "floats": ("DOUBLE", ["'nan'::DOUBLE", "'inf'::DOUBLE", "'-inf'::DOUBLE", "NULL"]),
    "float32": ("FLOAT", ["'nan'::FLOAT", "'-inf'::FLOAT", "0.1::FLOAT", "NULL"]),
    "ubig": ("UBIGINT", ["18446744073709551615::UBIGINT", "0::UBIGINT", "1::UBIGINT", "NULL"]),
}
EVERY_TYPE_SQL = ("SELECT * FROM (" + " UNION ALL ".join(
    f"SELECT {n} AS row_number, " + ", ".join(f"{values[n]} AS {name}" for name, (_, values) in EVERY_TYPE.items())
    + (" FROM range(2000) t(x)" if n == 0 else "") for n in range(4)) + ") ORDER BY row_number")


def _typed_back(path, fmt: str):
    """The file read back by DuckDB as a user would read a csv or json output of a typed query: json with each
    column's type declared, csv as text cast to each type (nested ones through JSON); a BLOB is base64 text."""
    if fmt == "json":
        declared = {name: "VARCHAR" if kind == "BLOB" else kind for name, (kind, _) in EVERY_TYPE.items()}
        reader = f"read_json('{path}', columns = {{'row_number': 'INTEGER', " + ", ".join(
            f"'{name}': '{kind}'" for name, kind in declared.items()) + "})"
    else:
        reader = f"read_csv('{path}', all_varchar = true, allow_quoted_nulls = false)"

    def cast(name: str, kind: str) -> str:
        if kind == "BLOB":
            return f"from_base64({name})"
        if fmt == "json":
            return name
        nested = kind.endswith("]") or kind.startswith(("MAP", "STRUCT"))
        return f"{name}::JSON::{kind}" if nested else f"{name}::{kind}"

    columns = ", ".join(f"{cast(name, kind)} AS {name}" for name, (kind, _) in EVERY_TYPE.items())
    with duckdb.connect() as con:
        con.execute("SET TimeZone = 'UTC'")
        return con.sql(f"SELECT {columns} FROM {reader} ORDER BY row_number::INTEGER").fetchall()


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_every_duckdb_type_round_trips_through_csv_and_json(runs, tmp_path, fmt):
    out = tmp_path / f"every.{fmt}"
    with loratrace.open_runs(runs) as db:
        db.con.execute("SET TimeZone = 'UTC'")
        expected = db.sql(f"SELECT * EXCLUDE (row_number) FROM ({EVERY_TYPE_SQL})").fetchall()
        table = db.fetch_table(f"SELECT * EXCLUDE (row_number), row_number FROM ({EVERY_TYPE_SQL})")
    from loratrace.query import formats
    formats.write(table, fmt, str(out))
    lines = out.read_text().splitlines()  # numbers are numbers, not quoted strings ("""1999000""", "1.50")
    if fmt == "csv":
        assert lines[1].startswith("1999000,170141183460469231731687303715884105727,1.50,1234567890123456789012345678.")
    else:
        assert lines[0].startswith('{"hugeint": 1999000, "uhugeint": 170141183460469231731687303715884105727, '
                                   '"dec": 1.50, "dec38": 1234567890123456789012345678.0123456789, ')
    got = _typed_back(out, fmt)
    for row_got, row_want in zip(got, expected, strict=True):
        for name, value_got, value_want in zip(EVERY_TYPE, row_got, row_want):
            assert _same(value_got, value_want), (name, value_got, value_want)


def test_a_uhugeint_arrow_cannot_hold_is_an_error_not_a_wrong_number(runs, capsys):
    from loratrace.cli import main

    assert main(["query", "SELECT 2::UHUGEINT ** 100 AS small, 1 + (2::UHUGEINT << 126) AS big", "--format", "json",
                 "--runs-dir", str(runs)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "the output formats hold a UHUGEINT below 2^127 only" in err and len(err.splitlines()) == 1
    assert main(["query", "SELECT (1::UHUGEINT << 126) AS fits", "--format", "csv", "--runs-dir", str(runs)]) == 0
    assert capsys.readouterr().out.split() == ["fits", str(2 ** 126)]
