"""`loratrace query`, `trace` and `runs`: the read-only commands (they never import torch or pandas)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pyarrow as pa

from loratrace.cli.common import FORMATS, add_runs_dir, emit, fail, open_read_only, seconds
from loratrace.overrides import flatten_keys
from loratrace.query import formats
from loratrace.query.accuracy import with_stderr
from loratrace.query.store import StoreError
from loratrace.query.views import VIEW_NAMES
from loratrace.runs.find import differing_keys, read_run_config

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


RUNS_DESCRIPTION = """List the runs under --runs-dir, oldest first: name, tags, status (`stale`: run.json says running
but its process on this host is gone), duration (training time of every launch), steps, final training loss, the best
eval accuracy +/- its standard error (sqrt(acc*(1-acc)/(n-1)), as lm-evaluation-harness reports it) and the
hyperparameters (config keys) that differ between the runs listed. The same facts are columns of the runs view.
Once a run listed is a replay (`loratrace replay`), a replay_of column says RUN@STEP -N: the run and checkpoint step
it was trained again from, without N examples (json/csv: replay_of_run, replay_of_step, replay_dropped).

--format json/csv: the columns unformatted (duration_s in seconds, best_eval_accuracy, best_eval_stderr,
best_eval_step, best_eval_split, dataset, checkpoints, ...), a differing key as a column named by its dotted key."""


def add_runs(sub) -> None:
    runs = sub.add_parser("runs", help="one line per run: name, tags, status, duration, steps, loss, best eval",
                          description=RUNS_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    runs.add_argument("--tag", action="append", metavar="T", help="only runs tagged T (repeatable: runs with every "
                                                                  "tag given)")
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


RUNS_COLUMNS = ("run_id", "name", "tags", "status", "duration_s", "steps", "final_loss", "best_eval_accuracy",
                "best_eval_stderr", "best_eval_step", "best_eval_split", "dataset", "checkpoints",
                "last_checkpoint_step", "missing_steps")
REPLAY_COLUMNS = ("replay_of_run", "replay_of_step", "replay_dropped")  # listed once any run listed is a replay


def cmd_runs(args: argparse.Namespace) -> int:
    with open_read_only(args.runs_dir) as db:
        table = db.fetch_table(f"SELECT {', '.join(RUNS_COLUMNS + REPLAY_COLUMNS)}, dir FROM runs "
                               "ORDER BY created_at, run_id")
        run_dirs = {str(d): d for d in db.run_dirs}
    if table.num_rows == 0:
        raise StoreError(f"no runs under {args.runs_dir}")
    rows = [row for row in table.to_pylist() if set(args.tag or ()) <= set(row["tags"])]
    if not rows:
        raise StoreError(f"no run under {args.runs_dir} is tagged {' and '.join(args.tag)}")
    configs = [read_run_config(run_dirs.get(row["dir"], Path(row["dir"]))) for row in rows]
    differing = differing_keys(configs)
    replays = any(row["replay_of_run"] is not None for row in rows)
    for row, config in zip(rows, configs):
        flat = flatten_keys(config)
        row.update({key: flat.get(key) for key in differing})
        for key in ("dir", *(() if replays else REPLAY_COLUMNS)):
            del row[key]
    if args.format == "table":
        emit(_typed_table([_shown_run(row, differing) for row in rows]), "table", None)
    else:
        emit(_typed_table(rows), args.format, None)
    return 0


def _shown_run(row: dict, differing: list[str]) -> dict:
    """A `runs` row for reading: durations as 1h02m, the best eval as accuracy +/- stderr and its step."""
    best = with_stderr(row["best_eval_accuracy"], row["best_eval_stderr"])
    best += f" (step {row['best_eval_step']})" if best else ""
    return {"run_id": row["run_id"], "name": row["name"] or "", "tags": ",".join(row["tags"]), "status": row["status"],
            "duration": _duration(row["duration_s"]), "steps": row["steps"], "final_loss": row["final_loss"],
            "best_eval": best, **_replay_text(row), **{key: _config_text(row[key]) for key in differing}}


def _replay_text(row: dict) -> dict:
    """A replay's origin as one column, `RUN@STEP -N` (N examples dropped); none when no run listed is a replay."""
    if "replay_of_run" not in row:
        return {}
    run, step, dropped = row["replay_of_run"], row["replay_of_step"], row["replay_dropped"]
    return {"replay_of": "" if run is None else f"{run}@{step} -{dropped}"}


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s" if rest >= 60 else f"{rest}s"


def _config_text(value) -> str:
    return "null" if value is None else ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _typed_table(rows: list[dict]) -> pa.Table:
    """The rows as an Arrow table, made by DuckDB from bound values (making Arrow arrays from Python objects imports
    pandas, which `runs` never does). A config key whose values are of different types across runs (true and 1, say)
    becomes JSON text, so every value still reads back as written."""
    import duckdb  # as store.py does; here only to turn rows into Arrow

    names = list(rows[0])
    for name in names:
        kinds = {type(row[name]) for row in rows if row[name] is not None}
        if len(kinds) > 1 and not kinds <= {int, float} or dict in kinds:
            for row in rows:
                row[name] = None if row[name] is None else json.dumps(row[name], default=str)
    values = ", ".join("(" + ", ".join("?" * (len(names) + 1)) + ")" for _ in rows)
    columns = ", ".join('"' + name.replace('"', '""') + '"' for name in ["row_number ", *names])
    with duckdb.connect() as con:
        return con.sql(f'SELECT * EXCLUDE ("row_number ") FROM (VALUES {values}) AS t({columns}) ORDER BY 1',
                       params=[value for number, row in enumerate(rows) for value in (number, *row.values())]) \
            .to_arrow_table()
