"""`loratrace query`, `trace` and `runs`: the read-only commands (they never import torch or pandas)."""

from __future__ import annotations

import argparse
import sys

from loratrace.cli.common import FORMATS, add_runs_dir, emit, fail, open_read_only, seconds
from loratrace.query import formats
from loratrace.query.store import StoreError
from loratrace.query.views import VIEW_NAMES

QUERY_DESCRIPTION = f"""SQL over the views {', '.join(VIEW_NAMES)} (docs/ARCHITECTURE.md, README "Query views").

The connection is read-only: one SELECT (or EXPLAIN [ANALYZE] SELECT, or a reporting PRAGMA such as
PRAGMA show_tables); SQL reads files only under the runs folder; a refused or failing query is one line, exit 1.
--timeout SECONDS stops a query that runs longer (one line, exit 1); Ctrl+C stops it at once (exit 130).

Formats (every value comes back from csv, json and parquet as the views hold it):
  table    for reading: at most 200 rows, cells cut at 60 characters, floats to 6 significant digits, NULL as NULL
  csv      RFC 4180 with a header row; NULL is an empty field, an empty string is ""; lists and structs are JSON text
           (e.g. ["a", null]; maps too); float32 values written as their exact double; DECIMAL/HUGEINT exact digits
  json     JSON Lines: one JSON object per row, keys in column order; lists as arrays (null inside kept); timestamps
           ISO 8601 with microseconds and offset; NaN/Infinity as bare words (Python's json and DuckDB read them);
           DECIMAL/HUGEINT as numbers with their exact digits; INTERVAL as DuckDB's text; BLOB as base64
  parquet  the result as an Arrow table (needs --output)"""


def add_query(sub) -> None:
    query = sub.add_parser("query", help="run SQL over the tracking views (read-only)",
                           description=QUERY_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    query.add_argument("sql", help="the query, or - to read it from stdin")
    query.add_argument("-p", "--param", action="append", default=[], metavar="VALUE",
                       help="value for the next ? placeholder (repeatable)")
    query.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table; see above)")
    query.add_argument("--output", "-o", help="write to this file instead of stdout (needed for parquet); its folder "
                                              "must exist, outside the runs folder; - is stdout")
    query.add_argument("--timeout", type=seconds, metavar="SECONDS",
                       help="stop the query if it runs longer than this (exit 1; default: no limit; Ctrl+C stops it "
                            "at once, exit 130)")
    add_runs_dir(query)


def add_trace(sub) -> None:
    trace = sub.add_parser("trace", help="every step and checkpoint that trained one example",
                           description="Every step an example trained at, and the first checkpoint that includes it.")
    key = trace.add_mutually_exclusive_group(required=True)
    key.add_argument("--example-id", help="the example's id")
    key.add_argument("--line", type=int, help="the example's 0-based row in its data file")
    trace.add_argument("--run", help="only this run id")
    trace.add_argument("--format", choices=FORMATS[:3], default="table", help="output format (default: table)")
    add_runs_dir(trace)


def add_runs(sub) -> None:
    runs = sub.add_parser("runs", help="one line per run: id, dataset, steps, checkpoints, status",
                          description="List the runs under --runs-dir.")
    runs.add_argument("--format", choices=FORMATS[:3], default="table", help="output format (default: table)")
    add_runs_dir(runs)


def cmd_query(args: argparse.Namespace) -> int:
    # bytes that are not UTF-8 kept as surrogates (as in argv), for the library to refuse in one line naming them
    sql = sys.stdin.buffer.read().decode("utf-8", "surrogateescape") if args.sql == "-" else args.sql
    if args.format == "parquet" and not args.output:
        return fail("--format parquet needs --output FILE", 2)
    formats.check_output(args.output, [args.runs_dir])  # before the query runs: nothing is half done
    with open_read_only(args.runs_dir) as db:
        table = db.fetch_table(sql, params=args.param or None, timeout=args.timeout)
    emit(table, args.format, args.output, [args.runs_dir])
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    with open_read_only(args.runs_dir) as db:
        table = db.trace_table(example_id=args.example_id, line=args.line, run_id=args.run)
    if args.format != "table":
        emit(table, args.format, None)
        return 0
    rows = table.to_pylist()
    for run_id in dict.fromkeys(r["run_id"] for r in rows):
        mine = [r for r in rows if r["run_id"] == run_id]
        first = next(r for r in mine if r["first"])
        where = (f"checkpoint-step {first['checkpoint_step']} ({first['checkpoint_path']})"
                 if first["checkpoint_step"] is not None else "no checkpoint yet")
        print(f"{run_id}: {first['example_id']} (line {first['line']}) trained at {len(mine)} step(s); "
              f"first included in {where}")
    columns = ["run_id", "step", "epoch", "loss", "p_gold", "correct", "checkpoint_step", "first"]
    emit(table.select(columns), "table", None)
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    with open_read_only(args.runs_dir) as db:
        table = db.fetch_table("SELECT run_id, dataset, steps, missing_steps, checkpoints, last_checkpoint_step, "
                               "status FROM runs ORDER BY run_id")
    if table.num_rows == 0:
        raise StoreError(f"no runs under {args.runs_dir}")
    emit(table, args.format, None)
    return 0
