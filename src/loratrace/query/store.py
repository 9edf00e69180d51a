"""DuckDB views over the tracking Parquet of one or many runs (docs/ARCHITECTURE.md, "Query layer").

    db = open_runs("runs/")                  # a runs folder, one run folder, a list of them, or a glob
    db.sql("SELECT step, loss FROM batches ORDER BY step").df()
    db.trace("LTSYN_TRA_0001")               # DataFrame: every step the example trained at, and its checkpoints

Connections are in-memory (a `.duckdb` file would lock other processes out). The Python API is fully open for
notebooks; `read_only=True` (the CLI) is the sandbox of sandbox.py: one reading statement, files only under the runs.
Views re-list the runs folder and the tracking folders before each query, so a run still training shows its new
parts and a new run shows up. Only the file names the tracker writes (schema.PART_NAMES) are read; a foreign file, a
part that cannot be read (cut short by a crash, say), a part linked from outside its run folder, a part whose pages
turn out damaged when a query reads them (`fetch_table` and `trace` then run again without it) or a missing
examples.parquet is reported once as a `StoreWarning` and skipped.
"""

from __future__ import annotations

import os
import re
import threading
import time
import warnings
from pathlib import Path

import duckdb
import pyarrow as pa
from typing_extensions import Self

from loratrace.errors import LoratraceError, duckdb_message, first_line
from loratrace.query import sandbox
from loratrace.query.samples_index import INDEX_FILE, TRACE_COLUMNS, TRACE_ORDER, SamplesIndex, index_fingerprint
from loratrace.query.views import VIEWS
from loratrace.runs import storage
from loratrace.runs.find import (
    DamagedRun,
    as_list,
    checkpoint_file_steps,
    find_runs,
    folders_of_runs,
    named_run_folders,
    read_run_folder,
    runs_info,
    study_folders,
)
from loratrace.runs.remote import RemoteRuns
from loratrace.track import schema
from loratrace.track.mappings import first_checkpoint


class StoreError(LoratraceError):
    """A query or lookup the user made that cannot be answered."""

    exit_code = 1


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


class QueryTimeout(StoreError):
    """A query stopped at its time limit (`query --timeout`, `fetch_table(timeout=...)`)."""


class SqlTextError(StoreError):
    """SQL text that cannot be handed to DuckDB at all (not UTF-8): input that cannot run."""

    exit_code = 2


class StoreWarning(UserWarning):
    """A file or run the views skip: foreign, unreadable, damaged, or missing."""


RUN_FILES = ("run.json", "config.yaml", "tracking", "checkpoints")  # what `runs_info` and its checks read

TABLES = {  # view name -> (folder or file under tracking/, schema)
    "batches_raw": ("batches", schema.BATCHES),
    "examples_raw": (schema.EXAMPLES_FILE, schema.EXAMPLES),
    "checkpoints_raw": ("checkpoints", schema.CHECKPOINTS),
    "attempts_raw": ("attempts", schema.ATTEMPTS),
    "evals_raw": ("evals", schema.EVALS),
    "influence_raw": ("influence", schema.INFLUENCE),
    "validations_raw": ("validations", schema.VALIDATIONS),
}


def _file_key(stat: os.stat_result) -> tuple[int, int, int]:
    """What tells one version of a file or folder from the next: a write moves the time or size, a replace the inode."""
    return stat.st_mtime_ns, stat.st_ino, stat.st_size


def _key_of(path: Path) -> tuple[int, int, int] | None:
    try:
        return _file_key(path.stat())
    except FileNotFoundError:
        return None


class Runs:
    """An in-memory DuckDB connection with loratrace's views over the given runs; with `sources` (what `open_runs`
    was given) the run list is re-listed when a folder of runs changes."""

    def __init__(self, run_dirs: list[Path], read_only: bool = False, sources=None):
        self.run_dirs = list(run_dirs)
        self._given = list(run_dirs)  # without `sources`: the runs to read, each named (a damaged one is an error)
        self._folders: dict = {}  # run folder -> its (run.json, config.yaml) as read_run_folder read them
        self.sources = sources
        self.read_only = read_only
        self.con = duckdb.connect(":memory:")
        self.remote = RemoteRuns(sources) if any(map(storage.is_remote, as_list(sources or []))) else None
        if self.remote is not None:  # listed by RemoteRuns, read by DuckDB through the same fsspec filesystem
            self.con.register_filesystem(self.remote.fs)
            self.con.execute("SET parquet_metadata_cache = true")  # each footer fetched once per connection
        self.con.create_function("first_checkpoint", first_checkpoint, ["BIGINT", "BIGINT[]"], "BIGINT",
                                 null_handling="special", side_effects=False)  # the views' step -> checkpoint rule
        self.files: dict[str, list[str]] = {}  # view -> the parts it reads
        self._reported: set[str] = set()  # files already reported as foreign, unreadable or missing
        self._checked: dict[str, tuple] = {}  # part -> (`_file_key` when its footer was read, its columns or None)
        self._pages_ok: dict[str, tuple] = {}  # part -> the `_file_key` at which all its pages read (`_pages_read`)
        self._indexes: dict | None = None  # run_id -> its index (a Path or RemotePath), found when `trace` needs them
        self._open_indexes: dict[str, tuple[tuple, SamplesIndex]] = {}  # path -> (stat when opened, reader)
        self._all_indexed = False
        self._listed: tuple[float, int, tuple] | None = None  # monotonic and wall time of the last listing, what it saw
        self._runs_key: tuple | None = None  # the run folders and the files behind `runs_info`, by `_key_of`
        self.relist_after = 1.0  # seconds: repeated calls inside this (a trace loop, say) skip re-listing
        # read_only: the folders DuckDB may read, fixed when the connection is locked; None: any
        self.readable: list[Path] | None = None
        if read_only and self.remote is None:
            self.readable = sandbox.named_folders(sources) if sources is not None else [d.resolve() for d in run_dirs]
        self.refresh(force=True)
        if read_only:
            folders = self.remote.sources if self.remote else self.readable
            sandbox.lock_down(self.con, [str(d) for d in folders])

    # ------------------------------------------------------------------ files -> views

    def _report(self, key: str, message: str) -> None:
        if key not in self._reported:
            self._reported.add(key)
            warnings.warn(message, StoreWarning, stacklevel=4)

    def _complete_parts(self, tracking: Path, name: str, expected: pa.Schema) -> list[str]:
        """The readable parts the tracker wrote under tracking/`name` (a folder, or one file)."""
        target = tracking / name
        if name == schema.EXAMPLES_FILE:
            paths = [target] if target.exists() else []
        elif not target.is_dir():
            paths = []
        else:
            paths = []
            for path in sorted(target.iterdir()):
                if schema.PART_NAMES[name].fullmatch(path.name):
                    paths.append(path)
                elif not path.name.startswith(".tmp-"):  # a part being written is not foreign
                    self._report(str(path), f"ignoring {path}: not a file name the tracker writes")
        return self._readable(self._inside_run(paths, tracking.parent), expected)

    def _inside_run(self, paths: list[Path], run_dir: Path) -> list[Path]:
        """The parts among `paths` (all in one folder) that are in their run folder once links are followed: nothing
        outside the runs is read (and the read-only connection's DuckDB would refuse every query that reads one).
        The folder is resolved once; a part only when it is a link itself. Object storage has no links."""
        if self.remote is not None or not paths:
            return paths
        run_dir, folder = run_dir.resolve(), paths[0].parent.resolve()
        inside = []
        for path in paths:
            real = path.resolve() if path.is_symlink() else folder / path.name
            if real == run_dir or real.is_relative_to(run_dir):
                inside.append(path)
            else:
                self._report(str(path), f"skipping tracking part {path}: a link to {real}, outside its run folder")
        return inside

    def _readable(self, paths: list[Path], expected: pa.Schema) -> list[str]:
        """The files among `paths` whose Parquet footer reads and has `expected`'s columns (schema.part_problem),
        checked again only when a file changes: a part DuckDB could not bind never reaches a view."""
        good = []
        for path in paths:
            key = str(path)
            stat_key = _key_of(path)
            if stat_key is None:
                continue
            if key not in self._checked or self._checked[key][0] != stat_key:
                try:
                    found = _footer_schema(path)
                except Exception:
                    self._checked[key] = (stat_key, None)
                    self._report(key, f"skipping unreadable tracking part {path}")
                else:
                    problem = schema.part_problem(found, expected)
                    self._checked[key] = (stat_key, None if problem else tuple((f.name, str(f.type)) for f in found))
                    self._reported.discard(key)
                    if problem:
                        self._report(key, f"skipping tracking part {path}: {problem}")
            if self._checked[key][1] is not None:
                good.append(key)
        return good

    def _signature(self) -> tuple:
        """The keys of every folder and file the views read: a part or run added, renamed or replaced changes its
        folder's. Object storage has no folder times: a remote listing holds for `relist_after` seconds."""
        if self.remote is not None:
            return ()
        folders = folders_of_runs(self.sources) if self.sources is not None else []
        signature = [_key_of(f) for f in folders] + [_key_of(f / "sweeps") for f in folders]
        signature += [_key_of(study) for study in self._studies()]
        for run_dir in self.run_dirs:
            signature += [_key_of(run_dir / name) for name in RUN_FILES]
            for name in ("", *(name for name, _ in TABLES.values())):  # "": tracking/ itself, for the index
                signature.append(_key_of(run_dir / "tracking" / name))
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
        """Re-list the runs and their parts (unless no folder changed); rebuild the views only if the set of files
        changed, and find which runs' samples indexes cover exactly their parts."""
        if not force and self._unchanged():
            return
        listed_wall = time.time_ns()
        listed = self._given if self.sources is None else self.remote.find_runs() if self.remote else self._sandboxed(
            find_runs(self.sources))
        runs_key = tuple((d, *(_key_of(d / name) for name in RUN_FILES)) for d in listed)
        if runs_key != self._runs_key:
            self._folders = self._read_folders(listed)
            self.run_dirs = list(self._folders)
            columns, rows = runs_info(self.run_dirs, self._folders)
            self._create_table("runs_info", [(c, "VARCHAR") for c in columns], rows)
            self._create_table("checkpoint_files", [("run_id", "VARCHAR"), ("step", "BIGINT")],
                               [[row[0], step] for row, d in zip(rows, self.run_dirs)
                                for step in checkpoint_file_steps(d)])
            self._runs_key = runs_key
        signature = self._signature()
        files = {view: [f for d in self.run_dirs for f in self._complete_parts(d / "tracking", name, table_schema)]
                 for view, (name, table_schema) in TABLES.items()}
        files["trials_raw"] = self._readable([study / schema.TRIALS_FILE for study in self._studies()
                                              if (study / schema.TRIALS_FILE).exists()], schema.TRIALS)
        self._listed = (0.0, listed_wall, signature)
        for run_dir in self.run_dirs:
            batches = str(run_dir / "tracking" / "batches") + "/"
            examples = run_dir / "tracking" / schema.EXAMPLES_FILE
            if any(f.startswith(batches) for f in files["batches_raw"]) and not examples.exists():
                self._report(str(examples), f"{examples} is missing: the examples view has no rows of run "
                                            f"{run_dir.name}")
        if files != self.files or force:
            self.files = files
            self._build_views()
            self._report_gaps()
        self._listed = (time.monotonic(), *self._listed[1:])  # aged from here: the CLI's next query won't re-list
        self._indexes = None

    def _report_gaps(self) -> None:
        """One warning per run whose tracked history has a hole (steps 1..its last with no effective batch row: a
        batches part deleted or lost), so that a count or a trace that leaves those steps out says why. Read once
        per change of the files; the runs view's `missing_steps` holds the count."""
        try:
            gaps = self.con.sql(GAPS).fetchall()
        except duckdb.Error:
            return  # a part that cannot be read: the query that reads it says so
        for run_id, spans in gaps:
            shown = schema.spans_text(spans)
            self._report(f"gap:{run_id}:{shown}", f"run {run_id} has no tracked rows for step(s) {shown} (a batches "
                                                  "part is missing): the views leave those steps out")

    def _read_folders(self, listed: list) -> dict:
        """Each run folder's (run.json, config.yaml). A damaged one (read_run_folder) found among many is skipped,
        reported once; one the caller named is the error: a command addressed at it cannot answer."""
        named = set(self._given) if self.sources is None else (
            {d for d in listed if str(d) in self.remote.sources} if self.remote else named_run_folders(self.sources))
        folders, owners = {}, {}
        for run_dir in listed:
            try:
                info, config = read_run_folder(run_dir)
            except DamagedRun as exc:
                if run_dir in named:
                    raise
                self._report(f"{run_dir}: {exc}", f"skipping run {run_dir.name}: {exc}")
                continue
            # Two folders of one run id (a copied run folder) would count every row twice in every view: the first
            # is read; the copy is skipped, or the error when both were named.
            run_id = info.get("run_id", run_dir.name)
            if run_id in owners and owners[run_id].resolve() == run_dir.resolve():
                continue  # one folder named twice (or by a link and by its name): read once, nothing to say
            if run_id in owners:
                what = f"{run_dir} holds run {run_id}, as {owners[run_id]} does (a copied run folder?)"
                if run_dir in named and owners[run_id] in named:
                    raise DamagedRun(f"{what}: name one of them")
                self._report(f"copy:{run_dir}", f"skipping {what}")
                continue
            owners[run_id] = run_dir
            folders[run_dir] = info, config
        return folders

    def _build_views(self) -> None:
        for view, (_, table_schema) in TABLES.items():
            self._create_raw_view(view, self.files[view], table_schema)
        self._create_raw_view("trials_raw", self.files["trials_raw"], schema.TRIALS)
        try:
            self._create_lineage()  # reads every attempts part
        except duckdb.Error as exc:
            if not (_may_be_damage(exc) and self._skip_damaged()):
                raise StoreError(f"cannot read the attempts of {self.where}: {duckdb_message(exc)}") from None
            return  # _skip_damaged built them without the damaged parts
        self._create_views()

    def _skip_damaged(self) -> bool:
        """Read every part the views read through (each once per version of the file); drop those whose data pages
        do not read (a footer that reads over garbage pages passes `_readable`), each reported once, and rebuild
        the views. False when every part reads: the error was not theirs."""
        damaged = {part for parts in self.files.values() for part in parts if not self._pages_read(part)}
        if not damaged:
            return False
        self.files = {view: [part for part in parts if part not in damaged] for view, parts in self.files.items()}
        self._indexes = None
        self._build_views()
        return True

    def _pages_read(self, part: str) -> bool:
        stat_key = self._checked[part][0]
        if self._pages_ok.get(part) == stat_key:
            return True
        try:
            for _ in self.con.sql(f"SELECT * FROM read_parquet({_sql_list([part])})").fetch_arrow_reader():
                pass
        except duckdb.Error as exc:
            if not _may_be_damage(exc):
                raise  # the network, say: not the part's fault
            self._checked[part] = (stat_key, None)  # skipped by every later refresh until the file changes
            self._report(part, f"skipping damaged tracking part {part}: {first_line(exc)}")
            return False
        self._pages_ok[part] = stat_key
        return True

    def _sandboxed(self, run_dirs: list[Path]) -> list[Path]:
        """`run_dirs` but those outside the folders a read-only connection may read, each reported once: DuckDB would
        refuse every query that reads them. The first listing, before the lock, adds its run folders to those
        folders (a run folder linked into the runs folder from another disk is the user's own); a run folder that
        appears outside them later (one a glob matches only now, say) is skipped."""
        if self.readable is None:
            return run_dirs
        if self._listed is None:
            self.readable += [run_dir.resolve() for run_dir in run_dirs]
        for run_dir in run_dirs:
            if not sandbox.inside(run_dir, self.readable):
                self._report(str(run_dir), f"skipping run folder {run_dir}: it is outside the folders this read-only "
                                           "connection was opened on (open it again to read it)")
        return [run_dir for run_dir in run_dirs if sandbox.inside(run_dir, self.readable)]

    def _studies(self) -> list[Path]:
        """The sweep study folders this connection reads trials from (runs/sweeps/*/, or the folders named); none on
        object storage, where sweeps do not run."""
        if self.sources is None or self.remote is not None:
            return []
        return study_folders(self.sources)

    def _find_indexes(self) -> dict[str, str]:
        if self._indexes is not None:
            return self._indexes
        self._indexes = {}  # run_id -> index file, for indexes that cover exactly the parts on disk now
        tracked = 0
        for run_dir in self.run_dirs:
            parts = index_fingerprint(run_dir, self.files)
            if not parts:
                continue  # nothing tracked in this folder
            tracked += 1
            try:
                stamp = self._open_index(run_dir / "tracking" / INDEX_FILE).stamp
            except (OSError, KeyError, TypeError, ValueError):
                continue
            if stamp and stamp["parts"] == parts:
                self._indexes[stamp["run_id"]] = run_dir / "tracking" / INDEX_FILE
        self._all_indexed = len(self._indexes) == tracked
        return self._indexes

    def _create_raw_view(self, view: str, files: list[str], table_schema: pa.Schema) -> None:
        if files:
            present = {name for f in files for name, _ in self._checked[f][1]}  # schema.LATER_COLUMNS may lack
            columns = ", ".join(_quoted(f.name) if f.name in present else
                                f"CAST(NULL AS {_duckdb_type(f.type)}) AS {_quoted(f.name)}" for f in table_schema)
            # union_by_name only when the parts' columns differ (an older tracker's, say): it makes DuckDB read every
            # footer at each bind of every view built on this one, a third of a second over a long run
            mixed = len({self._checked[f][1] for f in files}) > 1
            self.con.execute(f"CREATE OR REPLACE VIEW {view} AS SELECT {columns} "
                             f"FROM read_parquet({_sql_list(files)}{', union_by_name = true' if mixed else ''})")
        else:
            self._create_table(f"{view}_empty", [(f.name, _duckdb_type(f.type)) for f in table_schema], [])
            self.con.execute(f"CREATE OR REPLACE VIEW {view} AS SELECT * FROM {view}_empty")

    def _create_table(self, name: str, columns: list[tuple[str, str]], rows: list[list]) -> None:
        """An in-memory DuckDB table of (name, DuckDB type) columns. Not an Arrow table and `register`: making Arrow
        arrays from Python objects, or registering them, imports pandas, which would double the CLI's start-up."""
        self.con.execute(f"CREATE OR REPLACE TABLE {name} ({', '.join(f'{_quoted(c)} {t}' for c, t in columns)})")
        if rows:
            self.con.executemany(f"INSERT INTO {name} VALUES ({', '.join('?' * len(columns))})", rows)

    def _create_lineage(self) -> None:
        relation = self.con.sql("SELECT run_id, attempt, parent_attempt, resumed_step FROM attempts_raw")
        attempts = [dict(zip(relation.columns, row)) for row in relation.fetchall()]
        by_run: dict[str, list[dict]] = {}
        for row in attempts:
            by_run.setdefault(row["run_id"], []).append(row)
        rows = []
        for run_id, run_attempts in by_run.items():
            for attempt, (lower, upper) in schema.effective_ranges(run_attempts).items():
                rows.append({"run_id": run_id, "attempt": attempt, "lo": lower, "hi": upper})
        # A run folder without attempt records (written by hand or by an older tool): every row is effective. Only
        # its batch parts are read for their run_id: scanning every part would cost each query's start-up.
        recorded = {a.split("/tracking/")[0] for a in self.files["attempts_raw"]}
        unrecorded = [f for f in self.files["batches_raw"] if f.split("/tracking/")[0] not in recorded]
        if unrecorded:
            found = self.con.sql(f"SELECT DISTINCT run_id FROM read_parquet({_sql_list(unrecorded)})").fetchall()
            for (run_id,) in found:
                if run_id not in by_run:
                    rows.append({"run_id": run_id, "attempt": None, "lo": 0, "hi": None})
        self._create_table("lineage", [("run_id", "VARCHAR"), ("attempt", "INTEGER"), ("lo", "BIGINT"),
                                       ("hi", "BIGINT")], [[r["run_id"], r["attempt"], r["lo"], r["hi"]] for r in rows])

    def _create_views(self) -> None:
        for statement in VIEWS:
            self.con.execute(statement)

    # ------------------------------------------------------------------ queries

    def sql(self, query: str, params: list | None = None) -> duckdb.DuckDBPyRelation:
        """Run SQL over the views. With `read_only`, anything but one reading statement is refused."""
        _check_text(query)
        self.refresh()
        if self.read_only and (reason := sandbox.refusal(self.con, query)):
            raise StoreError(reason)
        try:
            return self._relation(query, params)
        except duckdb.Error as exc:
            raise StoreError(f"SQL error: {duckdb_message(exc)}") from None

    def fetch_table(self, query: str, params: list | None = None, timeout: float | None = None) -> pa.Table:
        """`sql` run to the end as an Arrow table: an error while running (a bad cast, say) is a StoreError too. A
        part whose pages turn out damaged is skipped with a warning, and the query runs again without it. A query
        still running after `timeout` seconds is stopped (`QueryTimeout`); Ctrl+C stops it at once (KeyboardInterrupt
        as usual, DuckDB interrupted first)."""
        return self._interruptible(lambda: self._fetch(query, params), timeout)

    def _fetch(self, query: str, params: list | None) -> pa.Table:
        relation = self.sql(query, params)
        if relation is None:
            return pa.table({})
        try:
            try:
                return _arrow_exact(relation).to_arrow_table()
            except duckdb.Error as exc:
                if not (_may_be_damage(exc) and self._skip_damaged()):
                    raise
            # bound to the views it was made on: made again on the rebuilt ones
            return _arrow_exact(self._relation(query, params)).to_arrow_table()
        except duckdb.InterruptException:
            raise
        except duckdb.ConversionException as exc:
            if not _has_uhugeint(relation):
                raise StoreError(f"SQL error: {duckdb_message(exc)}") from None
            raise StoreError(f"SQL error: {first_line(exc)} (the output formats hold a UHUGEINT below 2^127 only: "
                             "cast it to VARCHAR or DOUBLE)") from None
        except duckdb.Error as exc:
            raise StoreError(f"SQL error: {duckdb_message(exc)}") from None

    def _interruptible(self, compute, timeout: float | None):
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
            self.con.interrupt()
            _wait_out(done)
            raise
        if timed_out:
            self.con.interrupt()
            _wait_out(done)
            if "table" not in outcome:
                raise QueryTimeout(f"the query ran past its time limit of {timeout:g} s and was stopped (--timeout)")
        if isinstance(outcome.get("error"), duckdb.InterruptException):  # interrupted by another thread
            raise StoreError("the query was interrupted")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["table"]

    def _relation(self, query: str, params: list | None) -> duckdb.DuckDBPyRelation:
        return self.con.sql(query, params=params) if params else self.con.sql(query)

    def trace(self, example_id: str | None = None, line: int | None = None, run_id: str | None = None):
        """Every step where the example trained, with its loss, p(gold), correctness and the first checkpoint that
        includes each step; `first` marks the first checkpoint overall. DataFrame, one row per (run, step, slot)."""
        return self.trace_table(example_id, line, run_id).to_pandas()

    def trace_table(self, example_id: str | None = None, line: int | None = None,
                    run_id: str | None = None) -> pa.Table:
        """`trace` as an Arrow table (no pandas needed); a damaged part is skipped, and Ctrl+C stops it, as in
        `fetch_table`."""
        return self._interruptible(lambda: self._trace_skipping_damage(example_id, line, run_id), None)

    def _trace_skipping_damage(self, example_id: str | None, line: int | None, run_id: str | None) -> pa.Table:
        try:
            try:
                return self._trace_table(example_id, line, run_id)
            except duckdb.Error as exc:
                if not (_may_be_damage(exc) and self._skip_damaged()):
                    raise
            return self._trace_table(example_id, line, run_id)
        except duckdb.Error as exc:
            raise StoreError(f"cannot trace: {duckdb_message(exc)}") from None

    def _trace_table(self, example_id: str | None, line: int | None, run_id: str | None) -> pa.Table:
        if (example_id is None) == (line is None):
            raise StoreError("trace needs exactly one of an example id or a line")
        where, params = ("s.example_id = $key", {"key": example_id}) if example_id is not None else (
            "s.line = $key", {"key": int(line)})
        if run_id is not None:
            where += " AND s.run_id = $run"
            params["run"] = run_id
        self.refresh()
        if not self.run_dirs:
            raise StoreError(f"no runs under {self.where}")
        if not self.files["batches_raw"]:
            untracked = self._untracked(run_id)
            if untracked and (run_id or len(untracked) == len(self.run_dirs)):  # not a tracked run's first seconds
                raise StoreError(_not_tracked(untracked))
            raise StoreError(f"no tracked batches yet under {self.where}: a tracked run writes its first part at its "
                             "first checkpoint or after tracking.flush_every_steps updates")
        columns = ", ".join(TRACE_COLUMNS)
        tables = []
        # a run's samples index is sorted by example_id: read only the row groups that can hold it
        for run, path in list(self._find_indexes().items()):
            try:
                if example_id is not None and run_id in (None, run):
                    tables.append(self._open_index(path).rows(example_id))
                elif example_id is None:  # a line: every row group, but DuckDB reads just the line column first
                    tables.append(self.con.sql(f"SELECT {columns} FROM read_parquet({_sql_list([path])}) s "
                                               f"WHERE {where}", params=params).to_arrow_table())
            except (OSError, ValueError, duckdb.Error) as exc:
                self._distrust_index(run, path, exc)
        if not self._all_indexed:  # runs without a current index: the views, which unnest every batch
            params["indexed"] = sorted(self._indexes)
            views = (f"SELECT {columns} FROM example_trace s WHERE {where} "
                     "AND NOT list_contains($indexed::VARCHAR[], run_id)")
            tables.append(self.con.sql(views, params=params).to_arrow_table())
        if not tables or sum(t.num_rows for t in tables) == 0:
            raise StoreError(self._miss(example_id, line, run_id))  # a damaged part: `_trace_skipping_damage`
        table = pa.concat_tables(tables, promote_options="permissive")
        return table.sort_by([(c.strip(), "ascending") for c in TRACE_ORDER.split(",")])

    def _distrust_index(self, run: str, path, exc: Exception) -> None:
        """A samples index whose data cannot be read: `trace` answers for its run from the views (what the index
        was computed from), and says so once. The index is a reader's cache: it is left as it is."""
        self._report(str(path), f"samples index {path} cannot be read ({first_line(exc)}): tracing run {run} from "
                                "its batches instead")
        self._indexes.pop(run, None)
        self._all_indexed = False

    @property
    def where(self) -> str:
        """The runs this connection reads, in words."""
        named = self.sources if self.sources is not None else [str(d) for d in self.run_dirs]
        return ", ".join(map(str, as_list(named))) or "(no folders)"

    def _miss(self, example_id: str | None, line: int | None, run_id: str | None) -> str:
        what = f"example id {example_id!r}" if example_id is not None else f"line {line}"
        if run_id and not self.con.execute("SELECT 1 FROM runs_info WHERE run_id = ?", [run_id]).fetchall():
            return f"no run {run_id} under {self.where}"
        column, key = ("example_id", example_id) if example_id is not None else ("line", int(line))
        scope = " AND run_id = $run" if run_id else ""
        params = {"key": key, **({"run": run_id} if run_id else {})}
        known = [r[0] for r in self.con.execute(f"SELECT DISTINCT run_id FROM examples WHERE {column} = $key{scope} "
                                                "ORDER BY 1", params).fetchall()]
        if known:
            return f"{what} is in the examples of run {', '.join(known)} but was never trained (so far)"
        if run_id and self._untracked(run_id):
            return _not_tracked([run_id])
        if run_id:
            elsewhere = [r[0] for r in self.con.execute(f"SELECT DISTINCT run_id FROM samples WHERE {column} = $key "
                                                        "ORDER BY 1", {"key": key}).fetchall()]
            if elsewhere:
                return f"run {run_id} did not train {what} (run {', '.join(elsewhere)} did)"
        closest = self._closest(example_id)
        return f"no run trained {what}{f' in run {run_id}' if run_id else ''}{closest}"

    def _untracked(self, run_id: str | None) -> list[str]:
        """The runs (`run_id`, or all) whose config.yaml says they were trained without tracking.enabled."""
        columns = [c[0] for c in self.con.execute("SELECT * FROM runs_info LIMIT 0").description]
        if "tracking_enabled" not in columns:
            return []
        rows = self.con.execute("SELECT run_id FROM runs_info WHERE lower(tracking_enabled) = 'false' "
                                "AND ($run IS NULL OR run_id = $run) ORDER BY 1", {"run": run_id}).fetchall()
        return [row[0] for row in rows]

    def _open_index(self, path) -> SamplesIndex:
        key = _file_key(path.stat())
        cached = self._open_indexes.get(str(path))
        if cached is None or cached[0] != key:
            cached = self._open_indexes[str(path)] = (key, SamplesIndex(path))
        return cached[1]

    @property
    def indexed_runs(self) -> list[str]:
        """Runs whose samples index is current, so `trace` reads it instead of the views."""
        self.refresh()
        return sorted(self._find_indexes())

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


def open_runs(paths: str | Path | list = "runs", read_only: bool = False) -> Runs:
    """DuckDB views over every run under `paths` (see module docstring); a run added there later shows up too."""
    paths = [storage.local_form(p) for p in paths] if isinstance(paths, (list, tuple)) else storage.local_form(paths)
    return Runs([], read_only=read_only, sources=paths)  # its first refresh lists the runs (or says there are none)


UHUGEINT = re.compile(r"\bUHUGEINT\b")


def _wait_out(done: threading.Event) -> None:
    """Wait for an interrupted query to end (DuckDB stops within a vector's work), through a second Ctrl+C too: the
    interpreter must not exit while a thread runs inside DuckDB (it aborts the process)."""
    while True:
        try:
            done.wait()
            return
        except KeyboardInterrupt:
            continue


def _has_uhugeint(relation: duckdb.DuckDBPyRelation) -> bool:
    return any(UHUGEINT.search(str(kind)) for kind in relation.types)


def _arrow_exact(relation: duckdb.DuckDBPyRelation) -> duckdb.DuckDBPyRelation:
    """`relation` with each UHUGEINT (at any depth) cast to HUGEINT: DuckDB hands Arrow both as decimal128(38, 0), and
    a UHUGEINT from 2^127 on comes out as a negative number; cast, it is an out-of-range error instead."""
    if not _has_uhugeint(relation):
        return relation
    types = [str(kind) for kind in relation.types]
    columns = [f"CAST(#{n} AS {UHUGEINT.sub('HUGEINT', kind)})" if UHUGEINT.search(kind) else f"#{n}"
               for n, kind in enumerate(types, 1)]
    return relation.project(", ".join(f"{c} AS {_quoted(name)}" for c, name in zip(columns, relation.columns)))


# Errors that reading a damaged part gives (a bare duckdb.Error: "don't know what type", from the page headers'
# decoder); a query's own mistakes (parser, binder, catalog, conversion, ...) and the network's are other classes.
DAMAGE_ERRORS = (duckdb.IOException, duckdb.InvalidInputException, duckdb.InternalException,
                 duckdb.SerializationException)


def _may_be_damage(exc: duckdb.Error) -> bool:
    return (type(exc) is duckdb.Error or isinstance(exc, DAMAGE_ERRORS)) and not isinstance(exc, duckdb.HTTPException)


def _check_text(query: str) -> None:
    """Refuse SQL that is not UTF-8 text. Bytes that are not UTF-8 (SQL piped from a Latin-1 file, say) reach Python
    as lone surrogates (the surrogateescape of stdin and argv), which DuckDB's bindings reject with a TypeError."""
    try:
        query.encode("utf-8")
    except UnicodeEncodeError as exc:
        char = ord(query[exc.start])
        what = f"byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"character U+{char:04X}"
        raise SqlTextError(f"the SQL is not UTF-8 text ({what} at character {exc.start + 1}): save it as UTF-8") \
            from None


def _not_tracked(run_ids: list[str]) -> str:
    runs = f"run {run_ids[0]} was" if len(run_ids) == 1 else f"runs {', '.join(run_ids)} were"
    return (f"{runs} trained without batch tracking, so no example can be traced in it: train with --track-batches "
            "(tracking.enabled=true) to record which examples each step trained on")


DUCKDB_TYPES = {pa.string(): "VARCHAR", pa.bool_(): "BOOLEAN", pa.int8(): "TINYINT", pa.int32(): "INTEGER",
                pa.int64(): "BIGINT", pa.float32(): "FLOAT", pa.float64(): "DOUBLE"}


def _duckdb_type(kind: pa.DataType) -> str:
    if pa.types.is_list(kind):
        return _duckdb_type(kind.value_type) + "[]"
    if pa.types.is_struct(kind):
        return f"STRUCT({', '.join(f'{_quoted(f.name)} {_duckdb_type(f.type)}' for f in kind)})"
    if pa.types.is_timestamp(kind):
        return "TIMESTAMPTZ" if kind.tz else "TIMESTAMP"
    return DUCKDB_TYPES[kind]


def _footer_schema(path: Path) -> pa.Schema:
    """The Arrow schema in a part's footer (no data read); raises if the footer cannot be read."""
    import pyarrow.parquet as pq

    if hasattr(path, "footer_schema"):
        return path.footer_schema()  # a RemotePath: footers fetched together
    return pq.read_metadata(path).schema.to_arrow_schema()


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _sql_list(paths) -> str:
    """A SQL list literal of file paths, quotes escaped."""
    return "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths) + "]"
