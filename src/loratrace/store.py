"""DuckDB views over the tracking Parquet of one or many runs (DESIGN.md, "Query layer").

    db = open_runs("runs/")                  # a runs folder, one run folder, a list of them, or a glob
    db.sql("SELECT step, loss FROM batches ORDER BY step").df()
    db.trace("LTSYN_TRA_0001")               # DataFrame: every step the example trained at, and its checkpoints

Connections are in-memory (a `.duckdb` file would lock other processes out). The Python API is fully open for
notebooks; the CLI opens it with `read_only=True`: only SELECT-like statements, and files only under the runs.
Views re-read the folders before each query, so a run still training shows its new parts; a part that cannot be
read (cut short by a crash, say) is skipped with a warning.
"""

from __future__ import annotations

import bisect
import glob
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml
from typing_extensions import Self

from loratrace import schema
from loratrace.errors import LoratraceError


class StoreError(LoratraceError):
    """A query or lookup the user made that cannot be answered."""

    exit_code = 1


READ_ONLY_STATEMENTS = {"SELECT", "EXPLAIN", "PRAGMA"}
INDEX_ROW_GROUP = 8192  # rows per row group of the samples index: a trace decodes one or two of them
TRACE_COLUMNS = ("run_id", "example_id", "line", "step", "epoch", "micro_batch", "rank", "position", "loss", "p_gold",
                 "correct", "lr", "checkpoint_step", "checkpoint_path", "first")
TRACE_ORDER = "run_id, step, micro_batch, rank, position"
INDEX_FILE = "samples_index.parquet"  # tracking/<this>: example_trace sorted by example_id, written at the end
INDEX_KEY = b"loratrace.index"
TABLES = {  # view name -> (folder or file under tracking/, schema)
    "batches_raw": ("batches", schema.BATCHES),
    "examples_raw": ("examples.parquet", schema.EXAMPLES),
    "checkpoints_raw": ("checkpoints", schema.CHECKPOINTS),
    "attempts_raw": ("attempts", schema.ATTEMPTS),
    "evals_raw": ("evals", schema.EVALS),
}


def find_runs(paths: str | Path | list) -> list[Path]:
    """Run folders (those with config.yaml, run.json or tracking/) named by `paths`."""
    items = paths if isinstance(paths, (list, tuple)) else [paths]
    found: list[Path] = []
    for item in items:
        matches = [Path(m) for m in sorted(glob.glob(str(item)))] or [Path(item)]
        for path in matches:
            if _is_run(path):
                found.append(path)
            elif path.is_dir():
                found += [p for p in sorted(path.iterdir()) if p.is_dir() and _is_run(p)]
            else:
                raise StoreError(f"{path} is not a run folder or a folder of runs")
    return list(dict.fromkeys(p.resolve() for p in found))


def _is_run(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in ("run.json", "config.yaml", "tracking"))


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}_"))
        else:
            out[f"{prefix}{key}"] = ",".join(map(str, value)) if isinstance(value, list) else value
    return out


def _file_key(stat: os.stat_result) -> tuple[int, int, int]:
    """What tells one version of a file or folder from the next: a write moves the time or size, a replace the inode."""
    return stat.st_mtime_ns, stat.st_ino, stat.st_size


class SamplesIndex:
    """An open samples index: its footer parsed once and each row group's example_id range, so a trace decodes only
    the row group or two that can hold the id (the file is sorted by example_id)."""

    def __init__(self, path: str):
        self.file = pq.ParquetFile(path)
        meta, column = self.file.metadata, self.file.schema_arrow.get_field_index("example_id")
        stats = [meta.row_group(g).column(column).statistics for g in range(meta.num_row_groups)]
        if not all(st is not None and st.has_min_max for st in stats):
            raise ValueError(f"{path}: row groups without example_id statistics")
        self.low = [st.min for st in stats]
        self.high = [st.max for st in stats]
        self.stamp = json.loads((meta.metadata or {}).get(INDEX_KEY, b"null"))  # the run and the parts it covers

    def rows(self, example_id: str) -> pa.Table:
        first = bisect.bisect_left(self.high, example_id)  # the first row group whose range reaches the id
        last = first
        while last < len(self.low) and self.low[last] <= example_id:
            last += 1
        table = self.file.read_row_groups(range(first, last), columns=list(TRACE_COLUMNS), use_threads=False)
        return table.filter(pc.equal(table["example_id"], example_id))


class Runs:
    """An in-memory DuckDB connection with loratrace's views over the given runs."""

    def __init__(self, run_dirs: list[Path], read_only: bool = False):
        self.run_dirs = run_dirs
        self.read_only = read_only
        self.con = duckdb.connect(":memory:")
        self._files: dict[str, list[str]] = {}
        self._bad: set[str] = set()
        self._checked: dict[str, tuple[int, int, int]] = {}  # part -> `_file_key` when its footer was read
        self._indexes: dict[str, str] = {}
        self._open_indexes: dict[str, tuple[tuple, SamplesIndex]] = {}  # path -> (stat when opened, reader)
        self._all_indexed = False
        self._listed: tuple[float, int, tuple] | None = None  # (monotonic and wall time of the last listing, what
        # it saw)
        self.relist_after = 1.0  # seconds: repeated calls inside this (a trace loop, say) skip re-listing
        self._create_static_tables()
        self.refresh(force=True)
        if read_only:
            allowed = [str(d) + "/" for d in run_dirs]
            self.con.execute("SET allowed_directories = $1", [allowed])
            self.con.execute("SET enable_external_access = false")
            self.con.execute("SET lock_configuration = true")

    # ------------------------------------------------------------------ files -> views

    def _complete_parts(self, pattern_root: Path, name: str) -> list[str]:
        target = pattern_root / name
        paths = [target] if name.endswith(".parquet") else sorted(target.glob("*.parquet"))
        good = []
        for path in paths:
            key = str(path)
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            if self._checked.get(key) != _file_key(stat):
                self._checked[key] = _file_key(stat)
                try:
                    pq.read_metadata(path)
                    self._bad.discard(key)
                except Exception:
                    if key not in self._bad:
                        warnings.warn(f"skipping unreadable tracking part {path}", stacklevel=3)
                    self._bad.add(key)
            if key not in self._bad:
                good.append(key)
        return good

    def _signature(self) -> tuple:
        """The modification times of every folder and file the views read: a part added, renamed or replaced
        changes its folder's."""
        signature = []
        for run_dir in self.run_dirs:
            for name in ("", *(name for name, _ in TABLES.values())):  # "": tracking/ itself, for the index
                try:
                    signature.append(_file_key((run_dir / "tracking" / name).stat()))
                except FileNotFoundError:
                    signature.append(None)
        return tuple(signature)

    def _unchanged(self) -> bool:
        """Whether the last listing still holds: it is under `relist_after` seconds old, every folder's time was
        already settled when it was taken (older than the file system's clock tick: a change inside one tick keeps
        the time, the rule git uses for racy entries), and no folder's time has moved since. A server whose clock
        runs behind can defeat the tick rule; the age limit bounds how long a change goes unseen."""
        if self._listed is None:
            return False
        listed_at, listed_wall, signature = self._listed
        settled = all(entry is None or entry[0] < listed_wall - 50_000_000 for entry in signature)
        return settled and time.monotonic() - listed_at < self.relist_after and self._signature() == signature

    def refresh(self, force: bool = False) -> None:
        """Re-list the runs' parts (unless no folder changed); rebuild the views only if the set of files changed, and
        find which runs' samples indexes cover exactly their parts."""
        if not force and self._unchanged():
            return
        listed_at, listed_wall = time.monotonic(), time.time_ns()
        signature = self._signature()
        files = {view: [f for d in self.run_dirs for f in self._complete_parts(d / "tracking", name)]
                 for view, (name, _) in TABLES.items()}
        self._listed = (listed_at, listed_wall, signature)
        if files != self._files or force:
            self._files = files
            for view, (_, table_schema) in TABLES.items():
                self._create_raw_view(view, files[view], table_schema)
            self._create_lineage()
            self._create_views()
        self._indexes = {}  # run_id -> index file, for indexes that cover exactly the parts on disk now
        tracked = 0
        for run_dir in self.run_dirs:
            parts = index_fingerprint(run_dir, files)
            if not parts:
                continue  # nothing tracked in this folder
            tracked += 1
            try:
                stamp = self._open_index(str(run_dir / "tracking" / INDEX_FILE)).stamp
            except (OSError, KeyError, TypeError, ValueError):
                continue
            if stamp and stamp["parts"] == parts:
                self._indexes[stamp["run_id"]] = str(run_dir / "tracking" / INDEX_FILE)
        self._all_indexed = len(self._indexes) == tracked

    def _create_raw_view(self, view: str, files: list[str], table_schema: pa.Schema) -> None:
        if files:
            columns = ", ".join(f'"{f.name}"' for f in table_schema)
            self.con.execute(f"CREATE OR REPLACE VIEW {view} AS SELECT {columns} "
                             f"FROM read_parquet({_sql_list(files)}, union_by_name = true)")
        else:
            self.con.register(f"{view}_empty", table_schema.empty_table())
            self.con.execute(f"CREATE OR REPLACE VIEW {view} AS SELECT * FROM {view}_empty")

    def _create_static_tables(self) -> None:
        rows = []
        for run_dir in self.run_dirs:
            info = _read_json(run_dir / "run.json")
            config = _read_yaml(run_dir / "config.yaml")
            rows.append({
                "run_id": info.get("run_id", run_dir.name), "dir": str(run_dir),
                "dataset": info.get("dataset", config.get("data", {}).get("dataset")),
                "method": info.get("method", config.get("method")),
                "created_at": info.get("created_at"), "status": info.get("status", "unknown"),
                **{k: (None if v is None else str(v)) for k, v in _flatten(config).items()},
            })
        table = pa.Table.from_pylist(rows) if rows else pa.table({"run_id": pa.array([], pa.string()),
                                                                    "dir": pa.array([], pa.string())})
        self.con.register("runs_info", table)

    def _create_lineage(self) -> None:
        attempts = self.con.sql("SELECT * FROM attempts_raw").fetch_arrow_table().to_pylist()
        by_run: dict[str, list[dict]] = {}
        for row in attempts:
            by_run.setdefault(row["run_id"], []).append(row)
        rows = []
        for run_id, run_attempts in by_run.items():
            for attempt, (lower, upper) in schema.effective_ranges(run_attempts).items():
                rows.append({"run_id": run_id, "attempt": attempt, "lo": lower, "hi": upper})
        # A run without attempt records (written by hand or by an older tool): every row is effective.
        known = set(by_run)
        for row in self.con.sql("SELECT DISTINCT run_id FROM batches_raw").fetchall():
            if row[0] not in known:
                rows.append({"run_id": row[0], "attempt": None, "lo": 0, "hi": None})
        lineage = pa.Table.from_pylist(rows, schema=pa.schema([("run_id", pa.string()), ("attempt", pa.int32()),
                                                                ("lo", pa.int64()), ("hi", pa.int64())]))
        self.con.register("lineage", lineage)

    def _create_views(self) -> None:
        effective = ("l.run_id = {t}.run_id AND (l.attempt IS NULL OR l.attempt = {t}.attempt) "
                     "AND {t}.step > l.lo AND (l.hi IS NULL OR {t}.step <= l.hi)")
        self.con.execute(f"""
            CREATE OR REPLACE VIEW batches_all AS
            SELECT b.*, NOT EXISTS (SELECT 1 FROM lineage l WHERE {effective.format(t='b')}) AS orphaned
            FROM batches_raw b""")
        self.con.execute("CREATE OR REPLACE VIEW batches AS SELECT * EXCLUDE (orphaned) FROM batches_all "
                         "WHERE NOT orphaned")
        self.con.execute(f"""
            CREATE OR REPLACE VIEW checkpoints AS
            SELECT c.run_id, c.attempt, c.step, c.path, c.bytes, c.created_at,
                   r.dir || '/' || c.path AS file
            FROM checkpoints_raw c LEFT JOIN runs_info r USING (run_id)
            WHERE EXISTS (SELECT 1 FROM lineage l WHERE {effective.format(t='c')})""")
        self.con.execute("""
            CREATE OR REPLACE VIEW samples AS
            SELECT run_id, attempt, step, micro_batch, rank, epoch, batch_idx, stage, lr,
                   unnest(range(len(example_ids))) AS position,
                   unnest(example_ids) AS example_id, unnest(lines) AS line,
                   unnest(losses) AS loss, unnest(p_gold) AS p_gold, unnest(correct) AS correct
            FROM batches""")
        self.con.execute("CREATE OR REPLACE VIEW examples AS SELECT * FROM examples_raw")
        self.con.execute("CREATE OR REPLACE VIEW attempts AS SELECT * FROM attempts_raw")
        # Re-evaluating replaces nothing on disk; the latest evaluation of each (checkpoint, split, example) shows.
        self.con.execute("""
            CREATE OR REPLACE VIEW evals AS SELECT * FROM evals_raw
            QUALIFY row_number() OVER (PARTITION BY run_id, checkpoint_step, split, example_id
                                       ORDER BY evaluated_at DESC) = 1""")
        self.con.execute("""
            CREATE OR REPLACE VIEW step_checkpoint AS
            WITH steps AS (SELECT DISTINCT run_id, step FROM batches)
            SELECT s.run_id, s.step, c.step AS checkpoint_step, c.path AS checkpoint_path
            FROM steps s ASOF LEFT JOIN checkpoints c ON s.run_id = c.run_id AND c.step >= s.step""")
        self.con.execute("""
            CREATE OR REPLACE VIEW example_checkpoint AS
            WITH seen AS (SELECT DISTINCT run_id, example_id, line, step FROM samples)
            SELECT s.run_id, s.example_id, s.line, s.step, c.step AS checkpoint_step, c.path AS checkpoint_path,
                   row_number() OVER (PARTITION BY s.run_id, s.example_id, s.line ORDER BY s.step) = 1 AS first
            FROM seen s ASOF LEFT JOIN checkpoints c ON s.run_id = c.run_id AND c.step >= s.step""")
        self.con.execute(f"""
            CREATE OR REPLACE VIEW example_trace AS
            SELECT {', '.join('s.' + c if c not in ('checkpoint_step', 'checkpoint_path', 'first') else 'e.' + c
                              for c in TRACE_COLUMNS)}
            FROM samples s JOIN example_checkpoint e USING (run_id, example_id, line, step)""")
        self.con.execute("""
            CREATE OR REPLACE VIEW metrics AS
            WITH per_step AS (
                SELECT run_id, step,
                       sum(loss * n_target_tokens) / sum(n_target_tokens) AS "train/loss",
                       max(grad_norm) AS "train/grad_norm", max(lr) AS "train/lr",
                       avg(list_avg(correct::INT[])) AS "train/accuracy"
                FROM batches GROUP BY run_id, step)
            UNPIVOT per_step ON "train/loss", "train/grad_norm", "train/lr", "train/accuracy"
            INTO NAME name VALUE value""")
        self.con.execute("""
            CREATE OR REPLACE VIEW runs AS
            SELECT r.*, s.steps, s.examples_seen, c.checkpoints, c.last_checkpoint_step
            FROM runs_info r
            LEFT JOIN (SELECT run_id, max(step) AS steps, sum(len(example_ids)) AS examples_seen
                       FROM batches GROUP BY run_id) s USING (run_id)
            LEFT JOIN (SELECT run_id, count(*) AS checkpoints, max(step) AS last_checkpoint_step
                       FROM checkpoints GROUP BY run_id) c USING (run_id)""")

    # ------------------------------------------------------------------ queries

    def sql(self, query: str, params: list | None = None) -> duckdb.DuckDBPyRelation:
        """Run SQL over the views. With `read_only`, anything but a query is refused."""
        self.refresh()
        if self.read_only:
            try:
                statements = duckdb.extract_statements(query)
            except duckdb.Error as exc:
                raise StoreError(f"SQL error: {_first_line(exc)}") from None
            if len(statements) != 1:
                raise StoreError("give exactly one SQL statement")
            kind = statements[0].type.name
            if kind not in READ_ONLY_STATEMENTS:
                raise StoreError(f"{kind} statements are not allowed: this connection is read-only")
        try:
            return self.con.sql(query, params=params) if params else self.con.sql(query)
        except duckdb.Error as exc:
            raise StoreError(f"SQL error: {_first_line(exc)}") from None

    def trace(self, example_id: str | None = None, line: int | None = None, run_id: str | None = None):
        """Every step where the example trained, with its loss, p(gold), correctness and the first checkpoint that
        includes each step; `first` marks the first checkpoint overall. DataFrame, one row per (run, step, slot)."""
        if (example_id is None) == (line is None):
            raise StoreError("trace needs exactly one of an example id or a line")
        where, params = ("s.example_id = $key", {"key": example_id}) if example_id is not None else (
            "s.line = $key", {"key": int(line)})
        if run_id is not None:
            where += " AND s.run_id = $run"
            params["run"] = run_id
        self.refresh()
        columns = ", ".join(TRACE_COLUMNS)
        tables, parts = [], []
        for run, path in self._indexes.items():  # sorted by example_id: read only the row groups that can hold it
            if example_id is not None and run_id in (None, run):
                tables.append(self._open_index(path).rows(example_id))
            elif example_id is None:  # a line: every row group, but DuckDB reads just the line column first
                parts.append(f"SELECT {columns} FROM read_parquet({_sql_list([path])}) s WHERE {where}")
        if not self._all_indexed:  # runs without a current index: the views, which unnest every batch
            params["indexed"] = sorted(self._indexes)
            parts.append(f"SELECT {columns} FROM example_trace s WHERE {where} "
                         "AND NOT list_contains($indexed::VARCHAR[], run_id)")
        if parts:
            tables.append(self.con.execute(" UNION ALL ".join(parts), params).to_arrow_table())
        table = pa.concat_tables(tables, promote_options="permissive")
        frame = table.sort_by([(c.strip(), "ascending") for c in TRACE_ORDER.split(",")]).to_pandas()
        if frame.empty:
            what = f"example id {example_id!r}" if example_id is not None else f"line {line}"
            scope = f" in run {run_id}" if run_id else ""
            raise StoreError(f"no run trained {what}{scope}{self._closest(example_id)}")
        return frame

    def _open_index(self, path: str) -> SamplesIndex:
        key = _file_key(os.stat(path))
        cached = self._open_indexes.get(path)
        if cached is None or cached[0] != key:
            cached = self._open_indexes[path] = (key, SamplesIndex(path))
        return cached[1]

    @property
    def indexed_runs(self) -> list[str]:
        """Runs whose samples index is current, so `trace` reads it instead of the views."""
        self.refresh()
        return sorted(self._indexes)

    def _closest(self, example_id: str | None) -> str:
        if example_id is None:
            return ""
        rows = self.con.execute("""
            SELECT example_id FROM (SELECT DISTINCT example_id FROM examples
                                    UNION SELECT DISTINCT example_id FROM samples)
            ORDER BY jaro_winkler_similarity(example_id, $1) DESC LIMIT 3""", [example_id]).fetchall()
        return f" (closest: {', '.join(r[0] for r in rows)})" if rows else ""

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def index_fingerprint(run_dir: Path, files: dict[str, list[str]]) -> list[str]:
    """What a samples index covers: the run's batch and attempt parts, by name."""
    prefix = str(run_dir / "tracking") + "/"
    return sorted(f[len(prefix):] for view in ("batches_raw", "attempts_raw") for f in files[view]
                  if f.startswith(prefix))


def write_samples_index(run_dir: str | Path) -> Path:
    """tracking/samples_index.parquet: every effective sample with its trace columns, sorted by example_id in row
    groups of `INDEX_ROW_GROUP` rows, so `trace` reads one row group instead of unnesting every batch. Stamped with
    the parts it covers: a run that trains on (or is resumed) falls back to the views until the index is rewritten."""
    run_dir = Path(run_dir).resolve()
    with Runs([run_dir]) as db:
        run_id = db.con.sql("SELECT any_value(run_id) FROM batches_raw").fetchall()[0][0]
        if run_id is None:
            raise StoreError(f"{run_dir} has no tracked batches to index")
        stamp = json.dumps({"run_id": run_id, "parts": index_fingerprint(run_dir, db._files)})
        target = run_dir / "tracking" / INDEX_FILE
        tmp = target.parent / f".tmp-{target.name}.partial"
        db.con.execute(f"""
            COPY (SELECT {", ".join(TRACE_COLUMNS)} FROM example_trace ORDER BY example_id, {TRACE_ORDER})
            TO '{str(tmp).replace("'", "''")}'
            (FORMAT parquet, ROW_GROUP_SIZE {INDEX_ROW_GROUP}, COMPRESSION zstd,
             KV_METADATA {{'{INDEX_KEY.decode()}': '{stamp.replace("'", "''")}'}})""")
    os.replace(tmp, target)
    return target


def open_runs(paths: str | Path | list = "runs", read_only: bool = False) -> Runs:
    """DuckDB views over every run under `paths` (see module docstring)."""
    return Runs(find_runs(paths), read_only=read_only)


def _sql_list(paths) -> str:
    """A SQL list literal of file paths, quotes escaped."""
    return "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths) + "]"


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _read_yaml(path: Path) -> dict:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
