"""The tracking parts the views read (docs/ARCHITECTURE.md, "Query layer"): only the file names the tracker writes
(schema.PART_NAMES), inside their run folder, whose footer reads with the expected columns; each checked again only
when the file changes, and each one skipped reported once as a `StoreWarning`."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from loratrace.errors import first_line
from loratrace.query.damage import may_be_damage
from loratrace.query.errors import StoreWarning
from loratrace.query.manifest import Manifests, columns_problem, recorded_columns
from loratrace.query.tables import sql_list
from loratrace.track import schema

INDEX_FILE = "samples_index.parquet"  # tracking/<this>: every sample sorted by example_id (samples_index.py)
RUN_FILES = ("run.json", "config.yaml", "tracking", "checkpoints")  # what `runs_info` and its checks read

TABLES = {  # view name -> (folder or file under tracking/, schema)
    "batches_raw": ("batches", schema.BATCHES),
    "examples_raw": (schema.EXAMPLES_FILE, schema.EXAMPLES),
    "checkpoints_raw": ("checkpoints", schema.CHECKPOINTS),
    "attempts_raw": ("attempts", schema.ATTEMPTS),
    "evals_raw": ("evals", schema.EVALS),
    "influence_raw": ("influence", schema.INFLUENCE),
    "validations_raw": ("validations", schema.VALIDATIONS),
    "leave_one_out_raw": ("loo", schema.LEAVE_ONE_OUT),
}


def file_key(stat: os.stat_result) -> tuple[int, int, int]:
    """What tells one version of a file or folder from the next: a write moves the time or size, a replace the inode."""
    return stat.st_mtime_ns, stat.st_ino, stat.st_size


def key_of(path: Path) -> tuple[int, int, int] | None:
    try:
        return file_key(path.stat())
    except FileNotFoundError:
        return None


def footer_schema(path: Path) -> pa.Schema:
    """The Arrow schema in a part's footer (no data read); raises if the footer cannot be read."""
    if hasattr(path, "footer_schema"):
        return path.footer_schema()  # a RemotePath: footers fetched together
    return pq.read_metadata(path).schema.to_arrow_schema()


class Parts:
    """What is known of each part seen: the footer's columns at a version of the file (`checked`), the versions
    whose pages all read (`pages_ok`), and what was already reported (`reported`). `local`: no object storage,
    where there are no links to follow."""

    def __init__(self, local: bool):
        self.local = local
        self.manifests = Manifests()  # each run's manifest.json: the footers' columns as the run's end recorded them
        self.reported: set[str] = set()  # files already reported as foreign, unreadable or missing
        self.checked: dict[str, tuple] = {}  # part -> (`file_key` when its footer was read, its columns or None)
        self.pages_ok: dict[str, tuple] = {}  # part -> the `file_key` at which all its pages read (`pages_read`)

    def report(self, key: str, message: str) -> None:
        if key not in self.reported:
            self.reported.add(key)
            warnings.warn(message, StoreWarning, stacklevel=4)

    def complete(self, tracking: Path, name: str, expected: pa.Schema) -> list[str]:
        """The readable parts the tracker wrote under tracking/`name` (a folder, or one file). Nothing outside the
        runs is read (the read-only connection's DuckDB would refuse every query that reads one): a part that is
        not in its run folder once links are followed is skipped. Object storage has no links."""
        target = tracking / name
        if not self.local:
            return self._readable([(path, key_of(path)) for path in self._remote_parts(target, name)], expected)
        if name == schema.EXAMPLES_FILE:
            inside = target.exists() and self._inside(str(target), target.resolve(), tracking.parent.resolve())
            found = [(str(target), key_of(target))] if inside else []
        else:
            found = self._listed(target, name, tracking.parent)
        return self._readable(found, expected, tracking)

    def _remote_parts(self, target, name: str) -> list:
        if name == schema.EXAMPLES_FILE:
            return [target] if target.exists() else []
        if not target.is_dir():
            return []
        paths = []
        for path in sorted(target.iterdir()):
            if schema.PART_NAMES[name].fullmatch(path.name):
                paths.append(path)
            elif not path.name.startswith(".tmp-"):  # a part being written is not foreign
                self.report(str(path), f"ignoring {path}: not a file name the tracker writes")
        return paths

    def _listed(self, folder: Path, name: str, run_dir: Path) -> list[tuple[str, tuple]]:
        """The parts of the local `folder` the tracker names so that are in their run folder, each with its
        `file_key`, from one listing: a part's stat comes with its entry, the folder is resolved once, and a part
        only when it is a link itself (which the listing says without a call)."""
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except (FileNotFoundError, NotADirectoryError):
            return []
        pattern, found = schema.PART_NAMES[name], []
        real_run = real_folder = folder_inside = None
        for entry in entries:
            if not pattern.fullmatch(entry.name):
                if not entry.name.startswith(".tmp-"):  # a part being written is not foreign
                    self.report(entry.path, f"ignoring {entry.path}: not a file name the tracker writes")
                continue
            if real_run is None:
                real_run, real_folder = run_dir.resolve(), folder.resolve()
                folder_inside = real_folder == real_run or real_folder.is_relative_to(real_run)
            if entry.is_symlink():
                inside = self._inside(entry.path, Path(entry.path).resolve(), real_run)
            else:
                inside = folder_inside or self._inside(entry.path, real_folder / entry.name, real_run)
            try:
                if inside:
                    found.append((entry.path, file_key(entry.stat())))
            except FileNotFoundError:  # gone since the listing, or a link to nothing: as if never listed
                continue
        return found

    def _inside(self, path: str, real: Path, real_run: Path) -> bool:
        """Whether the part `path`, at `real` once links are followed, is in its (resolved) run folder; one that is
        not is reported."""
        if real == real_run or real.is_relative_to(real_run):
            return True
        self.report(path, f"skipping tracking part {path}: a link to {real}, outside its run folder")
        return False

    def readable(self, paths: list[Path], expected: pa.Schema) -> list[str]:
        """The files among `paths` whose Parquet footer reads and has `expected`'s columns (schema.part_problem),
        checked again only when a file changes: a part DuckDB could not bind never reaches a view."""
        return self._readable([(path, key_of(path)) for path in paths], expected)

    def _readable(self, found: list[tuple], expected: pa.Schema, tracking: Path | None = None) -> list[str]:
        """`readable` of (path, its `file_key` or None when gone) pairs. A part of the local `tracking` that its
        run's manifest knows as it is now is not read: the manifest has its columns."""
        good, recorded = [], None
        for path, stat_key in found:
            if stat_key is None:
                continue
            key = str(path)
            if key not in self.checked or self.checked[key][0] != stat_key:
                if recorded is None:  # the manifest's entries, by name under tracking/
                    recorded = self.manifests.entries(tracking) if tracking is not None else {}
                name = key[len(str(tracking)) + 1:] if tracking is not None else key
                known = recorded_columns(recorded, name, [stat_key[2], stat_key[0]])
                if known is not None and columns_problem(known, expected) is None:
                    self.checked[key] = (stat_key, known)
                else:
                    self._check(Path(path) if isinstance(path, str) else path, stat_key, expected)
            if self.checked[key][1] is not None:
                good.append(key)
        return good

    def _check(self, path: Path, stat_key: tuple, expected: pa.Schema) -> None:
        key = str(path)
        try:
            found = footer_schema(path)
        except Exception:
            self.checked[key] = (stat_key, None)
            self.report(key, f"skipping unreadable tracking part {path}")
            return
        problem = schema.part_problem(found, expected)
        self.checked[key] = (stat_key, None if problem else tuple((f.name, str(f.type)) for f in found))
        self.reported.discard(key)
        if problem:
            self.report(key, f"skipping tracking part {path}: {problem}")

    def columns(self) -> dict[str, tuple]:
        """part -> its (name, type) columns, for the parts whose footer read."""
        return {part: columns for part, (_, columns) in self.checked.items() if columns is not None}

    def pages_read(self, con: duckdb.DuckDBPyConnection, part: str) -> bool:
        """Whether every data page of `part` reads (checked once per version of the file); a damaged one is skipped
        by every later listing until the file changes, reported once."""
        stat_key = self.checked[part][0]
        if self.pages_ok.get(part) == stat_key:
            return True
        try:
            for _ in con.sql(f"SELECT * FROM read_parquet({sql_list([part])})").fetch_arrow_reader():
                pass
        except duckdb.Error as exc:
            if not may_be_damage(exc):
                raise  # the network, say: not the part's fault
            self.checked[part] = (stat_key, None)
            if part.endswith("/" + INDEX_FILE):  # a reader's copy: its run is read from its batches
                self.report(part, f"samples index {part} cannot be read ({first_line(exc)}): reading its run from its "
                                  "batches instead")
            else:
                self.report(part, f"skipping damaged tracking part {part}: {first_line(exc)}")
            return False
        self.pages_ok[part] = stat_key
        return True
