"""Running a query to its end: on a worker thread that Ctrl+C and a time limit can stop, SQL text checked first, and
its result handed to Arrow exactly (docs/ARCHITECTURE.md, "Query layer")."""

from __future__ import annotations

import re
import threading

import duckdb

from loratrace.query.errors import QueryTimeout, SqlTextError, StoreError
from loratrace.query.tables import quoted

UHUGEINT = re.compile(r"\bUHUGEINT\b")


def interruptible(con: duckdb.DuckDBPyConnection, compute, timeout: float | None):
    """`compute()` on a worker thread while this one waits: a thread blocked inside DuckDB runs no Python signal
    handler, so Ctrl+C would wait for the query's end; the waiting thread takes it (or the time limit) at once
    and stops DuckDB with `interrupt()`, DuckDB's way to cancel a running query from another thread."""
    outcome: dict = {}
    done = threading.Event()  # not Thread.join: a join that Ctrl+C interrupted can take the thread for ended

    def work() -> None:
        try:
            outcome["table"] = compute()
        except BaseException as exc:  # handed to the waiting thread, which raises it
            outcome["error"] = exc
        finally:
            done.set()

    threading.Thread(target=work, name="loratrace-query", daemon=True).start()
    try:
        timed_out = not done.wait(timeout)
    except KeyboardInterrupt:
        wait_out(con, done)
        raise
    if timed_out:
        wait_out(con, done)
        if "table" not in outcome:
            raise QueryTimeout(f"the query ran past its time limit of {timeout:g} s and was stopped (--timeout)")
    if isinstance(outcome.get("error"), duckdb.InterruptException):  # interrupted by another thread
        raise StoreError("the query was interrupted")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["table"]


def wait_out(con: duckdb.DuckDBPyConnection, done: threading.Event) -> None:
    """Stop the worker's query and wait for the worker to end (DuckDB stops within a vector's work), through a second
    Ctrl+C too: the interpreter must not exit while a thread runs inside DuckDB (it aborts the process). DuckDB is
    interrupted again every 0.1 s: an interrupt that comes before the query starts running (the worker still
    listing parts or binding) is lost, and the query would run to its end."""
    while True:
        try:
            con.interrupt()
            if done.wait(0.1):
                return
        except KeyboardInterrupt:
            continue


def has_uhugeint(relation: duckdb.DuckDBPyRelation) -> bool:
    return any(UHUGEINT.search(str(kind)) for kind in relation.types)


def arrow_exact(relation: duckdb.DuckDBPyRelation) -> duckdb.DuckDBPyRelation:
    """`relation` with each UHUGEINT (at any depth) cast to HUGEINT: DuckDB hands Arrow both as decimal128(38, 0), and
    a UHUGEINT from 2^127 on comes out as a negative number; cast, it is an out-of-range error instead."""
    if not has_uhugeint(relation):
        return relation
    types = [str(kind) for kind in relation.types]
    columns = [f"CAST(#{n} AS {UHUGEINT.sub('HUGEINT', kind)})" if UHUGEINT.search(kind) else f"#{n}"
               for n, kind in enumerate(types, 1)]
    return relation.project(", ".join(f"{c} AS {quoted(name)}" for c, name in zip(columns, relation.columns)))


def check_text(query: str) -> None:
    """Refuse SQL that is not UTF-8 text. Bytes that are not UTF-8 (SQL piped from a Latin-1 file, say) reach Python
    as lone surrogates (the surrogateescape of stdin and argv), which DuckDB's bindings reject with a TypeError."""
    try:
        query.encode("utf-8")
    except UnicodeEncodeError as exc:
        char = ord(query[exc.start])
        what = f"byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"character U+{char:04X}"
        raise SqlTextError(f"the SQL is not UTF-8 text ({what} at character {exc.start + 1}): save it as UTF-8") \
            from None

