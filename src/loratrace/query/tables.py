"""DuckDB tables and raw views the query views are built on (docs/ARCHITECTURE.md, "Query layer"): the in-memory
tables of Python rows, the `*_raw` views over a list of Parquet parts, and `lineage`, each run's effective attempts."""

from __future__ import annotations

import duckdb
import pyarrow as pa

from loratrace.track.lineage import effective_ranges

DUCKDB_TYPES = {pa.string(): "VARCHAR", pa.bool_(): "BOOLEAN", pa.int8(): "TINYINT", pa.int32(): "INTEGER",
                pa.int64(): "BIGINT", pa.float32(): "FLOAT", pa.float64(): "DOUBLE"}


def duckdb_type(kind: pa.DataType) -> str:
    if pa.types.is_list(kind):
        return duckdb_type(kind.value_type) + "[]"
    if pa.types.is_struct(kind):
        return f"STRUCT({', '.join(f'{quoted(f.name)} {duckdb_type(f.type)}' for f in kind)})"
    if pa.types.is_timestamp(kind):
        return "TIMESTAMPTZ" if kind.tz else "TIMESTAMP"
    return DUCKDB_TYPES[kind]


def quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def sql_list(paths) -> str:
    """A SQL list literal of file paths, quotes escaped."""
    return "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths) + "]"


def create_table(con: duckdb.DuckDBPyConnection, name: str, columns: list[tuple[str, str]], rows: list[list]) -> None:
    """An in-memory DuckDB table of (name, DuckDB type) columns. Not an Arrow table and `register`: making Arrow
    arrays from Python objects, or registering them, imports pandas, which would double the CLI's start-up."""
    con.execute(f"CREATE OR REPLACE TABLE {name} ({', '.join(f'{quoted(c)} {t}' for c, t in columns)})")
    if rows:  # one list a column, unnested side by side: binding each value alone costs ~15 us (100 runs' runs_info)
        unnested = ", ".join(f"unnest(${n}::{kind}[])" for n, (_, kind) in enumerate(columns, 1))
        con.execute(f"INSERT INTO {name} SELECT {unnested}", [list(values) for values in zip(*rows)])


def create_raw_view(con: duckdb.DuckDBPyConnection, view: str, files: list[str], table_schema: pa.Schema,
                    columns_of: dict[str, tuple]) -> None:
    """`view` over the parts `files`, with `table_schema`'s columns; `columns_of`: each part's (name, type) pairs
    as its footer has them (a column schema.LATER_COLUMNS may lack reads as NULL)."""
    if files:
        present = {name for f in files for name, _ in columns_of[f]}
        columns = ", ".join(quoted(f.name) if f.name in present else
                            f"CAST(NULL AS {duckdb_type(f.type)}) AS {quoted(f.name)}" for f in table_schema)
        # union_by_name only when the parts' columns differ (an older tracker's, say): it makes DuckDB read every
        # footer at each bind of every view built on this one, a third of a second over a long run
        mixed = len({columns_of[f] for f in files}) > 1
        con.execute(f"CREATE OR REPLACE VIEW {view} AS SELECT {columns} "
                    f"FROM read_parquet({sql_list(files)}{', union_by_name = true' if mixed else ''})")
    else:
        create_table(con, f"{view}_empty", [(f.name, duckdb_type(f.type)) for f in table_schema], [])
        con.execute(f"CREATE OR REPLACE VIEW {view} AS SELECT * FROM {view}_empty")


def create_lineage(con: duckdb.DuckDBPyConnection, files: dict[str, list[str]]) -> None:
    """The table `lineage`: (run_id, attempt, lo, hi), the steps lo < step <= hi each effective attempt owns
    (track.lineage.effective_ranges), from `attempts_raw`."""
    relation = con.sql("SELECT run_id, attempt, parent_attempt, resumed_step FROM attempts_raw")
    by_run: dict[str, list[dict]] = {}
    for row in relation.fetchall():
        record = dict(zip(relation.columns, row))
        by_run.setdefault(record["run_id"], []).append(record)
    rows = [[run_id, attempt, lower, upper] for run_id, run_attempts in by_run.items()
            for attempt, (lower, upper) in effective_ranges(run_attempts).items()]
    # A run folder without attempt records (written by hand or by an older tool): every row is effective. Only
    # its batch parts are read for their run_id: scanning every part would cost each query's start-up.
    recorded = {a.split("/tracking/")[0] for a in files["attempts_raw"]}
    unrecorded = [f for f in files["batches_raw"] if f.split("/tracking/")[0] not in recorded]
    if unrecorded:
        found = con.sql(f"SELECT DISTINCT run_id FROM read_parquet({sql_list(unrecorded)})").fetchall()
        rows += [[run_id, None, 0, None] for (run_id,) in found if run_id not in by_run]
    create_table(con, "lineage", [("run_id", "VARCHAR"), ("attempt", "INTEGER"), ("lo", "BIGINT"), ("hi", "BIGINT")],
                 rows)
