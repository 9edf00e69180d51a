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
examples.parquet is reported once as a `StoreWarning` and skipped. A finished run is read from its samples index,
flat, while the index covers exactly its parts (views.py), and its manifest stands for its parts' footers while they
keep the size and time it records (manifest.py): both are written at the end of the run (query/index.py).
"""

from __future__ import annotations

import time
from pathlib import Path

import duckdb
import pyarrow as pa
from typing_extensions import Self

from loratrace.errors import duckdb_message, first_line
from loratrace.query import sandbox, trace
from loratrace.query.damage import gap_warnings, may_be_damage
from loratrace.query.errors import QueryTimeout, SqlTextError, StoreError, StoreWarning
from loratrace.query.execute import arrow_exact, check_text, has_uhugeint, interruptible
from loratrace.query.parts import RUN_FILES, TABLES, Parts, key_of
from loratrace.query.samples_index import INDEX_SCHEMA, TRACE_COLUMNS, TRACE_ORDER, Indexes, SamplesIndex
from loratrace.query.tables import create_lineage, create_raw_view, create_table
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

__all__ = ["QueryTimeout", "Runs", "SamplesIndex", "SqlTextError", "StoreError", "StoreWarning", "TRACE_COLUMNS",
           "TRACE_ORDER", "open_runs"]  # the errors and the index reader, importable from here as before


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
        self.parts = Parts(local=self.remote is None)  # each part's footer and pages as checked, what was reported
        self._reported = self.parts.reported
        self.indexes = Indexes(self.parts.manifests)  # the runs' samples indexes: `trace` and the views read them
        self.recorded_gaps: dict[str, list] = {}  # run_id -> its missing steps, as its (flat) samples index recorded
        self.flat_runs: set[str] = set()  # the runs the views read from their samples index (`samples_flat_raw`)
        self._flat_run_of: dict[str, str] = {}  # flat samples index -> its run_id
        self._listed: tuple[float, int, tuple] | None = None  # monotonic and wall time of the last listing, what it saw
        self._runs_key: tuple | None = None  # the run folders and the files behind `runs_info`, by `key_of`
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

    def _signature(self) -> tuple:
        """The keys of every folder and file the views read: a part or run added, renamed or replaced changes its
        folder's. Object storage has no folder times: a remote listing holds for `relist_after` seconds."""
        if self.remote is not None:
            return ()
        folders = folders_of_runs(self.sources) if self.sources is not None else []
        signature = [key_of(f) for f in folders] + [key_of(f / "sweeps") for f in folders]
        signature += [key_of(study) for study in self._studies()]
        for run_dir in self.run_dirs:
            signature += [key_of(run_dir / name) for name in RUN_FILES]
            for name in ("", *(name for name, _ in TABLES.values())):  # "": tracking/ itself, for the index
                signature.append(key_of(run_dir / "tracking" / name))
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
        self._read_runs(listed)
        signature = self._signature()
        files = {view: [f for d in self.run_dirs for f in self.parts.complete(d / "tracking", name, table_schema)]
                 for view, (name, table_schema) in TABLES.items()}
        files["trials_raw"] = self.parts.readable([study / schema.TRIALS_FILE for study in self._studies()
                                                   if (study / schema.TRIALS_FILE).exists()], schema.TRIALS)
        files["samples_flat_raw"] = self._flat_indexes(files)
        self._listed = (0.0, listed_wall, signature)
        tracked = {part.rsplit("/tracking/batches/", 1)[0] for part in files["batches_raw"]}
        for run_dir in self.run_dirs:
            examples = run_dir / "tracking" / schema.EXAMPLES_FILE
            if str(run_dir) in tracked and not examples.exists():
                self.parts.report(str(examples), f"{examples} is missing: the examples view has no rows of run "
                                                 f"{run_dir.name}")
        if files != self.files or force:
            self.files = files
            self._build_views()
            for key, message in gap_warnings(self.con, self.recorded_gaps):
                self.parts.report(key, message)
        self._listed = (time.monotonic(), *self._listed[1:])  # aged from here: the CLI's next query won't re-list

    def _flat_indexes(self, files: dict[str, list[str]]) -> list[str]:
        """The samples indexes the views read instead of unnesting their runs' batches (views.py): current (they
        cover exactly their run's parts now, each at the size and time it had), of this loratrace (with every
        column of `samples`), and whose pages read (one found damaged is left out until it changes)."""
        self.indexes.found = None
        flat = []
        self.recorded_gaps, self._flat_run_of = {}, {}
        for run_id, path in self.indexes.find(self.run_dirs, files).items():
            info = self.indexes.info[str(path)]
            stat_key, known = key_of(path), self.parts.checked.get(str(path))
            if not info["flat"] or known == (stat_key, None) or not self._same_versions(path.parent, info["stamp"]):
                continue
            self.parts.checked[str(path)] = (stat_key, info["columns"])
            self.recorded_gaps[run_id] = info["stamp"]["gaps"]
            self._flat_run_of[str(path)] = run_id
            flat.append(str(path))
        return flat

    def _same_versions(self, tracking, stamp: dict) -> bool:
        """Whether every part a samples index covers has the size and time it had when the index was written (a
        part rewritten under its own name keeps the name the index's "parts" lists)."""
        for name in stamp["parts"]:
            stat_key = self.parts.checked.get(f"{tracking}/{name}", (None,))[0]  # (mtime_ns, inode, size)
            recorded = stamp["files"].get(name)
            if stat_key is None:
                return False
            # object storage gives an upload's time, not the file's: there a part is known again by its size
            if recorded is None or recorded[0] != stat_key[2] or (self.remote is None and recorded[1] != stat_key[0]):
                return False
        return True

    def _read_runs(self, listed: list) -> None:
        """The tables `runs_info` and `checkpoint_files` of the run folders `listed`, read again only when one of
        them or their run.json, config.yaml, tracking/ or checkpoints/ changed."""
        runs_key = tuple((d, *(key_of(d / name) for name in RUN_FILES)) for d in listed)
        if runs_key == self._runs_key:
            return
        self._folders = self._read_folders(listed)
        self.run_dirs = list(self._folders)
        columns, rows = runs_info(self.run_dirs, self._folders)
        create_table(self.con, "runs_info", [(c, "VARCHAR") for c in columns], rows)
        create_table(self.con, "checkpoint_files", [("run_id", "VARCHAR"), ("step", "BIGINT")],
                     [[row[0], step] for row, d in zip(rows, self.run_dirs) for step in checkpoint_file_steps(d)])
        self._runs_key = runs_key

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
                self.parts.report(f"{run_dir}: {exc}", f"skipping run {run_dir.name}: {exc}")
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
                self.parts.report(f"copy:{run_dir}", f"skipping {what}")
                continue
            owners[run_id] = run_dir
            folders[run_dir] = info, config
        return folders

    def _build_views(self) -> None:
        columns = self.parts.columns()
        for view, (_, table_schema) in TABLES.items():
            create_raw_view(self.con, view, self.files[view], table_schema, columns)
        flat = self.files["samples_flat_raw"]
        self.flat_runs = {self._flat_run_of[path] for path in flat}
        create_raw_view(self.con, "samples_flat_raw", flat, INDEX_SCHEMA, columns)
        flat_runs = {f.rsplit("/tracking/", 1)[0] for f in flat}
        create_raw_view(self.con, "batches_unflat_raw", [f for f in self.files["batches_raw"]
                                                         if f.rsplit("/tracking/", 1)[0] not in flat_runs],
                        schema.BATCHES, columns)
        create_raw_view(self.con, "trials_raw", self.files["trials_raw"], schema.TRIALS, columns)
        try:
            create_lineage(self.con, self.files)  # reads every attempts part
        except duckdb.Error as exc:
            if not (may_be_damage(exc) and self.skip_damaged()):
                raise StoreError(f"cannot read the attempts of {self.where}: {duckdb_message(exc)}") from None
            return  # skip_damaged built them without the damaged parts
        for statement in VIEWS:
            self.con.execute(statement)

    def skip_damaged(self) -> bool:
        """Read every part the views read through (each once per version of the file); drop those whose data pages
        do not read (a footer that reads over garbage pages passes `Parts.readable`), each reported once, and
        rebuild the views. False when every part reads: the error was not theirs."""
        damaged = {part for parts in self.files.values() for part in parts
                   if not self.parts.pages_read(self.con, part)}
        if not damaged:
            return False
        self.files = {view: [part for part in parts if part not in damaged] for view, parts in self.files.items()}
        self.indexes.found = None
        self._build_views()
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
                self.parts.report(str(run_dir), f"skipping run folder {run_dir}: it is outside the folders this "
                                                "read-only connection was opened on (open it again to read it)")
        return [run_dir for run_dir in run_dirs if sandbox.inside(run_dir, self.readable)]

    def _studies(self) -> list[Path]:
        """The sweep study folders this connection reads trials from (runs/sweeps/*/, or the folders named); none on
        object storage, where sweeps do not run."""
        if self.sources is None or self.remote is not None:
            return []
        return study_folders(self.sources)

    # ------------------------------------------------------------------ queries

    def sql(self, query: str, params: list | None = None) -> duckdb.DuckDBPyRelation:
        """Run SQL over the views. With `read_only`, anything but one reading statement is refused."""
        check_text(query)
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
        return interruptible(self.con, lambda: self._fetch(query, params), timeout)

    def _fetch(self, query: str, params: list | None) -> pa.Table:
        relation = self.sql(query, params)
        if relation is None:
            return pa.table({})
        try:
            try:
                return arrow_exact(relation).to_arrow_table()
            except duckdb.Error as exc:
                if not (may_be_damage(exc) and self.skip_damaged()):
                    raise
            # bound to the views it was made on: made again on the rebuilt ones
            return arrow_exact(self._relation(query, params)).to_arrow_table()
        except duckdb.InterruptException:
            raise
        except duckdb.ConversionException as exc:
            if not has_uhugeint(relation):
                raise StoreError(f"SQL error: {duckdb_message(exc)}") from None
            raise StoreError(f"SQL error: {first_line(exc)} (the output formats hold a UHUGEINT below 2^127 only: "
                             "cast it to VARCHAR or DOUBLE)") from None
        except duckdb.Error as exc:
            raise StoreError(f"SQL error: {duckdb_message(exc)}") from None

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
        return interruptible(self.con, lambda: trace.trace_table(self, example_id, line, run_id), None)

    @property
    def where(self) -> str:
        """The runs this connection reads, in words."""
        named = self.sources if self.sources is not None else [str(d) for d in self.run_dirs]
        return ", ".join(map(str, as_list(named))) or "(no folders)"

    @property
    def indexed_runs(self) -> list[str]:
        """Runs whose samples index is current, so `trace` reads it instead of the views."""
        self.refresh()
        return sorted(self.indexes.find(self.run_dirs, self.files))

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
