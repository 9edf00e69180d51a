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
