"""Damaged parts and holes in a run's history, as the views meet them (docs/ARCHITECTURE.md, "Query layer"): which
DuckDB errors can come from a damaged part, and the steps of each run that no effective batch row covers."""

from __future__ import annotations

import duckdb

from loratrace.track import schema

# The runs whose effective batches (in `{batches}`) miss steps below their last, with the missing steps as [first,
# last] spans (gaps and islands: consecutive missing steps share step - row_number()). Only holey runs expand.
GAPS = """
    WITH holey AS (SELECT run_id, max(step) AS steps FROM {batches} GROUP BY run_id
                   HAVING max(step) > count(DISTINCT step) FILTER (WHERE step >= 1)),
    present AS (SELECT DISTINCT run_id, step FROM {batches} WHERE run_id IN (SELECT run_id FROM holey)),
    missing AS (SELECT run_id, unnest(range(1, steps + 1)) AS step FROM holey
                EXCEPT SELECT run_id, step FROM present),
    spans AS (SELECT run_id, min(step) AS first, max(step) AS last
              FROM (SELECT *, step - row_number() OVER (PARTITION BY run_id ORDER BY step) AS island FROM missing)
              GROUP BY run_id, island)
    SELECT run_id, list([first, last] ORDER BY first) FROM spans GROUP BY run_id ORDER BY run_id"""


def gaps(con: duckdb.DuckDBPyConnection, batches: str = "batches") -> dict[str, list[list[int]]]:
    """run_id -> its missing steps as [first, last] spans, for the runs of the view `batches` with a hole."""
    rows = con.sql(GAPS.format(batches=batches)).fetchall()
    return {run_id: [list(span) for span in spans] for run_id, spans in rows}


# Errors that reading a damaged part gives (a bare duckdb.Error: "don't know what type", from the page headers'
# decoder); a query's own mistakes (parser, binder, catalog, conversion, ...) and the network's are other classes.
DAMAGE_ERRORS = (duckdb.IOException, duckdb.InvalidInputException, duckdb.InternalException,
                 duckdb.SerializationException)


def may_be_damage(exc: duckdb.Error) -> bool:
    return (type(exc) is duckdb.Error or isinstance(exc, DAMAGE_ERRORS)) and not isinstance(exc, duckdb.HTTPException)


def gap_warnings(con: duckdb.DuckDBPyConnection, known: dict[str, list]) -> list[tuple[str, str]]:
    """(key, message) for each run whose tracked history has a hole (steps 1..its last with no effective batch row:
    a batches part deleted or lost): the runs read from their batches, and `known`, the gaps their samples indexes
    recorded of the others. None from the batches when a part cannot be read (the query that reads it says so)."""
    try:
        found = {**known, **gaps(con, "batches_unflat")}
    except duckdb.Error:
        found = dict(known)
    warned = []
    for run_id, spans in sorted(found.items()):
        if not spans:
            continue
        shown = schema.spans_text(spans)
        warned.append((f"gap:{run_id}:{shown}", f"run {run_id} has no tracked rows for step(s) {shown} (a batches "
                                                "part is missing): the views leave those steps out"))
    return warned
