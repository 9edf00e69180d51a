"""Damaged parts and holes in a run's history, as the views meet them (docs/ARCHITECTURE.md, "Query layer"): which
DuckDB errors can come from a damaged part, and the steps of each run that no effective batch row covers."""

from __future__ import annotations

import duckdb

from loratrace.track import schema

# The runs whose effective batches miss steps below their last, with the missing steps as [first, last] spans
# (gaps and islands: consecutive missing steps share step - row_number()). Only runs with missing_steps > 0 expand.
GAPS = """
    WITH holey AS (SELECT run_id, steps FROM runs WHERE missing_steps > 0),
    present AS (SELECT DISTINCT run_id, step FROM batches WHERE run_id IN (SELECT run_id FROM holey)),
    missing AS (SELECT run_id, unnest(range(1, steps + 1)) AS step FROM holey
                EXCEPT SELECT run_id, step FROM present),
    spans AS (SELECT run_id, min(step) AS first, max(step) AS last
              FROM (SELECT *, step - row_number() OVER (PARTITION BY run_id ORDER BY step) AS island FROM missing)
              GROUP BY run_id, island)
    SELECT run_id, list([first, last] ORDER BY first) FROM spans GROUP BY run_id ORDER BY run_id"""

# Errors that reading a damaged part gives (a bare duckdb.Error: "don't know what type", from the page headers'
# decoder); a query's own mistakes (parser, binder, catalog, conversion, ...) and the network's are other classes.
DAMAGE_ERRORS = (duckdb.IOException, duckdb.InvalidInputException, duckdb.InternalException,
                 duckdb.SerializationException)


def may_be_damage(exc: duckdb.Error) -> bool:
    return (type(exc) is duckdb.Error or isinstance(exc, DAMAGE_ERRORS)) and not isinstance(exc, duckdb.HTTPException)


def gap_warnings(con: duckdb.DuckDBPyConnection) -> list[tuple[str, str]]:
    """(key, message) for each run whose tracked history has a hole (steps 1..its last with no effective batch row:
    a batches part deleted or lost); none when a part cannot be read (the query that reads it says so)."""
    try:
        gaps = con.sql(GAPS).fetchall()
    except duckdb.Error:
        return []
    warned = []
    for run_id, spans in gaps:
        shown = schema.spans_text(spans)
        warned.append((f"gap:{run_id}:{shown}", f"run {run_id} has no tracked rows for step(s) {shown} (a batches "
                                                "part is missing): the views leave those steps out"))
    return warned
