"""The read-only sandbox of `open_runs(..., read_only=True)`, the CLI's connection (docs/ARCHITECTURE.md, "Query
layer").

Two locks, each enough for what it covers:
  1. `refusal(con, sql)`, an allow-list of what may run: one SELECT whose parse tree holds only query nodes that read
     (a `WITH ... AS (INSERT ... RETURNING ...)` is a SELECT statement too, and is refused), an EXPLAIN [ANALYZE] of
     such a SELECT, or one of `REPORTING_PRAGMAS`. Anything else (COPY, EXPORT, ATTACH, CALL, SET, INSTALL, a
     statement type this duckdb has no name for, two statements, ...) is refused before it runs.
  2. `lock_down(con, folders)`, DuckDB's own settings: files are read only under `folders` (`named_folders`: the
     folders the user named, a glob's matches and never its fixed prefix), no extension is loaded or installed,
     nothing spills to a temp folder, no Python variable is scanned, and then the configuration is locked.
     (DuckDB's `allowed_directories` lets COPY and EXPORT *write* there too: only lock 1 keeps the runs unchanged.)
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

import duckdb

from loratrace.errors import duckdb_message

# PRAGMAs that only report; the rest change settings or read and write files (import_database, copy_database, ...).
REPORTING_PRAGMAS = frozenset({"show_tables", "show_tables_expanded", "table_info", "database_list", "database_size",
                               "version", "platform", "user_agent", "functions", "collations"})
# Query nodes of DuckDB's parse tree (json_serialize_sql) that only read; any other *_NODE (INSERT_QUERY_NODE, a type a
# later DuckDB adds) refuses the statement.
READING_QUERY_NODES = frozenset({"SELECT_NODE", "SET_OPERATION_NODE", "RECURSIVE_CTE_NODE", "CTE_NODE"})
ALLOWED = "this connection is read-only: one SELECT, EXPLAIN [ANALYZE] SELECT or reporting PRAGMA"


def refusal(con: duckdb.DuckDBPyConnection, sql: str) -> str | None:
    """Why `sql` may not run on a read-only connection, or None when it may. `con` only parses (json_serialize_sql)."""
    try:
        statements = duckdb.extract_statements(sql)
        kinds = [statement.type for statement in statements]
    except duckdb.Error as exc:
        return f"SQL error: {duckdb_message(exc)}"
    except ValueError:  # the parser knows a statement type this duckdb module has no name for
        return f"a statement of a type loratrace does not know is not allowed: {ALLOWED}"
    if len(statements) != 1:
        return f"give exactly one SQL statement, not {len(statements)}: {ALLOWED}"
    kind = kinds[0]
    if kind == duckdb.StatementType.SELECT:
        return _select_refusal(con, sql)
    if kind == duckdb.StatementType.EXPLAIN:
        explained = _explained(sql)
        try:
            inner = [s.type for s in duckdb.extract_statements(explained)] if explained else []
        except (duckdb.Error, ValueError):
            inner = []
        if inner != [duckdb.StatementType.SELECT]:
            return f"EXPLAIN is allowed of one SELECT only: {ALLOWED}"
        return _select_refusal(con, explained)
    if kind == duckdb.StatementType.PRAGMA:
        words = _words(sql)  # IMPORT DATABASE and COPY FROM DATABASE parse as PRAGMAs too
        name = " ".join(words[:2]) if words[0].upper() == "PRAGMA" else f"{words[0]} statement"
        if words[0].upper() == "PRAGMA" and words[1].lower() in REPORTING_PRAGMAS and "=" not in words:
            return None
        return f"{name} is not allowed: {ALLOWED}"
    return f"{kind.name} statements are not allowed: {ALLOWED}"


def _select_refusal(con: duckdb.DuckDBPyConnection, sql: str) -> str | None:
    try:
        tree = json.loads(con.execute("SELECT json_serialize_sql($1::VARCHAR)", [sql]).fetchall()[0][0])
    except (duckdb.Error, TypeError, ValueError) as exc:
        return f"cannot check this statement ({duckdb_message(exc)}): {ALLOWED}"
    if tree.get("error"):
        return f"cannot check this statement ({tree.get('error_message')}): {ALLOWED}"
    writing = sorted(set(_query_nodes(tree)) - READING_QUERY_NODES)
    if writing:
        kinds = ", ".join(n.removesuffix("_QUERY_NODE").removesuffix("_NODE") for n in writing)
        return f"a SELECT holding {kinds} is not allowed: {ALLOWED}"
    return None


def _query_nodes(tree):
    """Every query node type in a json_serialize_sql tree."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key == "type" and isinstance(value, str) and value.endswith("_NODE"):
                yield value
            else:
                yield from _query_nodes(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from _query_nodes(value)


def _tokens(sql: str) -> list[tuple[int, str]]:
    """(offset, text) of each token but comments, from DuckDB's own tokenizer."""
    found = duckdb.tokenize(sql)
    ends = [start for start, _ in found[1:]] + [len(sql)]
    return [(start, sql[start:end].strip()) for (start, kind), end in zip(found, ends)
            if kind != duckdb.token_type.comment]


def _words(sql: str) -> list[str]:
    return [text for _, text in _tokens(sql)]


def _explained(sql: str) -> str | None:
    """The statement an `EXPLAIN [ANALYZE] [(options)] <statement>` explains, or None if it has another shape."""
    tokens = _tokens(sql)
    if not tokens or tokens[0][1].upper() != "EXPLAIN":
        return None
    at = 1
    if at < len(tokens) and tokens[at][1].upper() in ("ANALYZE", "ANALYSE"):
        at += 1
    if at < len(tokens) and tokens[at][1].startswith("("):
        depth = 0
        while at < len(tokens):
            depth += tokens[at][1].count("(") - tokens[at][1].count(")")
            at += 1
            if depth <= 0:
                break
    return sql[tokens[at][0]:] if at < len(tokens) else None


def named_folders(sources) -> list[Path]:
    """The folders `sources` (a path, a glob or a list of them) name, resolved as DuckDB checks them (symlinks
    followed, `..` gone). A glob stands for its matches: its fixed prefix (`/` for `/tm*/x/runs`) is no runs folder,
    and a folder that matches later is not readable on this connection (store.py skips its runs with a warning)."""
    folders = []
    for item in sources if isinstance(sources, (list, tuple)) else [sources]:
        text = str(item)
        matches = sorted(glob.glob(text)) if glob.has_magic(text) else [text]
        folders += [Path(match).resolve() for match in matches if Path(match).is_dir()]
    return list(dict.fromkeys(folders))


def inside(path: Path, folders: list[Path]) -> bool:
    """Whether `path`, resolved, lies in one of the (resolved) `folders`: what `lock_down` lets DuckDB read."""
    real = Path(path).resolve()
    return any(real == folder or real.is_relative_to(folder) for folder in folders)


def lock_down(con: duckdb.DuckDBPyConnection, folders: list[str]) -> None:
    """Confine `con` to reading files under `folders`, then lock its configuration (no SET undoes this)."""
    settings = [("temp_directory", ""), ("enable_progress_bar", False), ("python_enable_replacements", False),
                ("autoinstall_known_extensions", False), ("autoload_known_extensions", False),
                ("allowed_directories", [f.rstrip("/") + "/" for f in folders]), ("enable_external_access", False),
                ("lock_configuration", True)]
    for name, value in settings:
        con.execute(f"SET {name} = $1", [value])

