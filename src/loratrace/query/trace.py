"""`Runs.trace`: every step where one example trained, from each run's samples index where it is current and from
the views otherwise (docs/ARCHITECTURE.md, "Query layer"), and the one line that says why nothing was found."""

from __future__ import annotations

import duckdb
import pyarrow as pa

from loratrace.errors import duckdb_message, first_line
from loratrace.query.damage import may_be_damage
from loratrace.query.errors import StoreError
from loratrace.query.samples_index import TRACE_COLUMNS, TRACE_ORDER
from loratrace.query.tables import sql_list


def trace_table(db, example_id: str | None, line: int | None, run_id: str | None) -> pa.Table:
    """The trace rows of `db` (a `Runs`); a damaged part is skipped (`Runs.skip_damaged`) and the trace made again."""
    try:
        try:
            return _trace(db, example_id, line, run_id)
        except duckdb.Error as exc:
            if not (may_be_damage(exc) and db.skip_damaged()):
                raise
        return _trace(db, example_id, line, run_id)
    except duckdb.Error as exc:
        raise StoreError(f"cannot trace: {duckdb_message(exc)}") from None


def _trace(db, example_id: str | None, line: int | None, run_id: str | None) -> pa.Table:
    if (example_id is None) == (line is None):
        raise StoreError("trace needs exactly one of an example id or a line")
    where, params = ("s.example_id = $key", {"key": example_id}) if example_id is not None else (
        "s.line = $key", {"key": int(line)})
    if run_id is not None:
        where += " AND s.run_id = $run"
        params["run"] = run_id
    db.refresh()
    if not db.run_dirs:
        raise StoreError(f"no runs under {db.where}")
    if not db.files["batches_raw"]:
        untracked = untracked_runs(db.con, run_id)
        if untracked and (run_id or len(untracked) == len(db.run_dirs)):  # not a tracked run's first seconds
            raise StoreError(not_tracked(untracked))
        raise StoreError(f"no tracked batches yet under {db.where}: a tracked run writes its first part at its "
                         "first checkpoint or after tracking.flush_every_steps updates")
    columns = ", ".join(TRACE_COLUMNS)
    indexes = {run: path for run, path in db.indexes.find(db.run_dirs, db.files).items() if run_id in (None, run)}
    tables = _from_indexes(db, indexes, where, params)
    if not db.indexes.all_indexed:  # runs without a current index: the views, which unnest every batch
        params["indexed"] = sorted(db.indexes.found)
        views = (f"SELECT {columns} FROM example_trace s WHERE {where} "
                 f"AND NOT list_contains($indexed::VARCHAR[], run_id) ORDER BY {TRACE_ORDER}")
        tables.append(db.con.sql(views, params=params).to_arrow_table())
    if not tables or sum(t.num_rows for t in tables) == 0:
        raise StoreError(_miss(db, example_id, line, run_id))  # a damaged part: `trace_table`
    if len(tables) == 1:
        return tables[0]  # sorted by DuckDB: pyarrow's sort would import pyarrow.compute, 40 ms of a first trace
    table = pa.concat_tables(tables, promote_options="permissive")
    return table.sort_by([(c.strip(), "ascending") for c in TRACE_ORDER.split(",")])


def _from_indexes(db, indexes: dict, where: str, params: dict) -> list[pa.Table]:
    """The trace rows of the runs in `indexes` (run_id -> its current samples index): one DuckDB query over them all.
    Each index is sorted by example_id in row groups of 65,536 rows with min/max statistics, so DuckDB reads only
    the row groups that can hold the id and, in them, skips the pages whose statistics rule it out; the footers,
    small at that size, are read on DuckDB's own threads (docs/SCALING.md). A line is not sorted: each row group's
    line column is read first. An index that cannot be read is found by reading each alone: its run is traced
    from its batches instead, as the views trace a run without an index."""
    if not indexes:
        return []
    mixed = len({tuple(db.indexes.info[str(path)]["columns"]) for path in indexes.values()}) > 1  # an older index
    by_name = ", union_by_name = true" if mixed else ""
    query = (f"SELECT {', '.join(TRACE_COLUMNS)} FROM read_parquet({{files}}{by_name}) s WHERE {where} "
             f"ORDER BY {TRACE_ORDER}")
    try:
        return [db.con.sql(query.format(files=sql_list(indexes.values())), params=params).to_arrow_table()]
    except duckdb.InterruptException:
        raise
    except duckdb.Error:
        pass
    tables = []
    for run, path in indexes.items():
        try:
            tables.append(db.con.sql(query.format(files=sql_list([path])), params=params).to_arrow_table())
        except duckdb.InterruptException:
            raise
        except (OSError, ValueError, duckdb.Error) as exc:
            _unreadable(db, run, path, exc)
    return tables


def _unreadable(db, run: str, path, exc: Exception) -> None:
    """`run`'s index cannot be read: said once, and the run traced from its batches instead."""
    db.parts.report(str(path), f"samples index {path} cannot be read ({first_line(exc)}): tracing run {run} "
                               "from its batches instead")
    db.indexes.distrust(run)  # a reader's cache: left as it is on disk


def _miss(db, example_id: str | None, line: int | None, run_id: str | None) -> str:
    con = db.con
    what = f"example id {example_id!r}" if example_id is not None else f"line {line}"
    if run_id and not con.execute("SELECT 1 FROM runs_info WHERE run_id = ?", [run_id]).fetchall():
        return f"no run {run_id} under {db.where}"
    column, key = ("example_id", example_id) if example_id is not None else ("line", int(line))
    scope = " AND run_id = $run" if run_id else ""
    params = {"key": key, **({"run": run_id} if run_id else {})}
    known = [r[0] for r in con.execute(f"SELECT DISTINCT run_id FROM examples WHERE {column} = $key{scope} "
                                       "ORDER BY 1", params).fetchall()]
    if known:
        return f"{what} is in the examples of run {', '.join(known)} but was never trained (so far)"
    if run_id and untracked_runs(con, run_id):
        return not_tracked([run_id])
    if run_id:
        elsewhere = [r[0] for r in con.execute(f"SELECT DISTINCT run_id FROM samples WHERE {column} = $key "
                                               "ORDER BY 1", {"key": key}).fetchall()]
        if elsewhere:
            return f"run {run_id} did not train {what} (run {', '.join(elsewhere)} did)"
    closest = _closest(con, example_id)
    return f"no run trained {what}{f' in run {run_id}' if run_id else ''}{closest}"


def untracked_runs(con: duckdb.DuckDBPyConnection, run_id: str | None) -> list[str]:
    """The runs (`run_id`, or all) whose config.yaml says they were trained without tracking.enabled."""
    columns = [c[0] for c in con.execute("SELECT * FROM runs_info LIMIT 0").description]
    if "tracking_enabled" not in columns:
        return []
    rows = con.execute("SELECT run_id FROM runs_info WHERE lower(tracking_enabled) = 'false' "
                       "AND ($run IS NULL OR run_id = $run) ORDER BY 1", {"run": run_id}).fetchall()
    return [row[0] for row in rows]


def _closest(con: duckdb.DuckDBPyConnection, example_id: str | None) -> str:
    if example_id is None:
        return ""
    rows = con.execute("""
        SELECT example_id FROM (SELECT DISTINCT example_id FROM examples
                                UNION SELECT DISTINCT example_id FROM samples)
        ORDER BY jaro_winkler_similarity(example_id, $1) DESC LIMIT 3""", [example_id]).fetchall()
    return f" (closest: {', '.join(r[0] for r in rows)})" if rows else ""


def not_tracked(run_ids: list[str]) -> str:
    runs = f"run {run_ids[0]} was" if len(run_ids) == 1 else f"runs {', '.join(run_ids)} were"
    return (f"{runs} trained without batch tracking, so no example can be traced in it: train with --track-batches "
            "(tracking.enabled=true) to record which examples each step trained on")
