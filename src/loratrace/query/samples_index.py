"""tracking/samples_index.parquet: every effective sample of a run sorted by example_id, so `trace` reads the pages
that hold one id instead of unnesting every batch. Written at the end of training (query/index.py,
`write_samples_index`); found here, read by `Runs.trace` (query/trace.py), while it still covers exactly the run's
parts on disk.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from loratrace.query.manifest import Manifests
from loratrace.query.parts import INDEX_FILE
from loratrace.track import schema

# rows per row group of the samples index: small footers (a trace over many runs parses each), and DuckDB skips the
# pages of a row group that cannot hold the id (docs/SCALING.md has the sizes measured)
INDEX_ROW_GROUP = 65536
TRACE_COLUMNS = ("run_id", "example_id", "line", "step", "epoch", "micro_batch", "rank", "position", "loss", "p_gold",
                 "correct", "lr", "checkpoint_step", "checkpoint_path", "first")
TRACE_ORDER = "run_id, step, micro_batch, rank, position"
INDEX_KEY = b"loratrace.index"
# The `samples` view's columns, in its order: an index that holds them all (and rows) is the flat copy of its run's
# samples the views read instead of unnesting its batches (views.py, `samples_flat_raw`)
SAMPLE_COLUMNS = ("run_id", "attempt", "step", "micro_batch", "rank", "epoch", "batch_idx", "stage", "lr", "position",
                  "example_id", "line", "loss", "p_gold", "correct")
INDEX_COLUMNS = TRACE_COLUMNS + ("attempt", "batch_idx", "stage")  # what query/index.py writes
INDEX_SCHEMA = pa.schema([  # the types the views give these columns (from schema.BATCHES: a list's items)
    ("run_id", pa.string()), ("example_id", pa.string()), ("line", pa.int64()), ("step", pa.int64()),
    ("epoch", pa.int32()), ("micro_batch", pa.int32()), ("rank", pa.int32()), ("position", pa.int64()),
    ("loss", pa.float32()), ("p_gold", pa.float32()), ("correct", pa.bool_()), ("lr", pa.float64()),
    ("checkpoint_step", pa.int64()), ("checkpoint_path", pa.string()), ("first", pa.bool_()),
    ("attempt", pa.int32()), ("batch_idx", pa.int64()), ("stage", pa.int8())])


class SamplesIndex:
    """A samples index's footer: what it holds (the run and parts it covers, its columns)."""

    def __init__(self, path):
        local = isinstance(path, (str, os.PathLike))
        with (contextlib.nullcontext(path) if local else path.open()) as source, pq.ParquetFile(source) as file:
            meta, found = file.metadata, file.schema_arrow  # a RemotePath's file closed here too
        column = found.get_field_index("example_id")
        if column < 0:
            raise ValueError(f"{path}: no example_id column")
        # a trace reads only the row groups whose example_id range holds the id: an index without the ranges is not
        # the sorted one loratrace writes
        stats = [meta.row_group(g).column(column).statistics for g in range(meta.num_row_groups)]
        if not all(st is not None and st.has_min_max for st in stats):
            raise ValueError(f"{path}: row groups without example_id statistics")
        self.stamp = json.loads((meta.metadata or {}).get(INDEX_KEY, b"null"))  # the run and the parts it covers
        self.columns = tuple((f.name, str(f.type)) for f in found)
        # an index of an older loratrace lacks columns of the samples view: `trace` reads it, the views do not
        self.flat = (meta.num_rows > 0 and schema.part_problem(found, INDEX_SCHEMA) is None
                     and isinstance(self.stamp, dict) and "gaps" in self.stamp and "files" in self.stamp)


def index_fingerprint(run_dir: Path, files: dict[str, list[str]]) -> list[str]:
    """What a samples index covers: the run's batch, attempt and checkpoint parts (it holds each step's checkpoint),
    by name."""
    return index_fingerprints(files).get(str(run_dir / "tracking"), [])


def index_fingerprints(files: dict[str, list[str]]) -> dict[str, list[str]]:
    """`index_fingerprint` of every run at once, by its tracking folder: one pass over the parts, not one a run."""
    covered: dict[str, list[str]] = {}
    for view in ("batches_raw", "attempts_raw", "checkpoints_raw"):
        for part in files[view]:
            tracking, _, name = part.rpartition("/tracking/")
            covered.setdefault(tracking + "/tracking", []).append(name)
    return {tracking: sorted(names) for tracking, names in covered.items()}


class Indexes:
    """The runs whose samples index covers exactly their parts on disk now (found at each listing that changes the
    parts), and what each index holds (from the run's manifest while it knows the file, else from its footer)."""

    def __init__(self, manifests: Manifests):
        self.manifests = manifests
        self.found: dict | None = None  # run_id -> its index (a Path or RemotePath)
        self.all_indexed = False  # every tracked run has one: `trace` reads no view
        self.info: dict[str, dict] = {}  # index path -> {"stamp", "flat", "columns"}, of the indexes found

    def find(self, run_dirs: list[Path], files: dict[str, list[str]]) -> dict:
        if self.found is not None:
            return self.found
        self.found, self.info = {}, {}
        tracked, covered = 0, index_fingerprints(files)
        for run_dir in run_dirs:
            parts = covered.get(str(run_dir / "tracking"), [])
            if not parts:
                continue  # nothing tracked in this folder
            tracked += 1
            path = run_dir / "tracking" / INDEX_FILE
            try:
                info = self._describe(path)
            except (OSError, KeyError, TypeError, ValueError):
                continue
            if info["stamp"] and info["stamp"]["parts"] == parts:
                self.found[info["stamp"]["run_id"]] = path
                self.info[str(path)] = info
        self.all_indexed = len(self.found) == tracked
        return self.found

    def _describe(self, path) -> dict:
        stat = path.stat()
        known = self.manifests.index_stamp(path.parent, stat) if isinstance(path, Path) else None
        if known is not None and isinstance(known.get("stamp"), dict):
            return {"stamp": known["stamp"], "flat": bool(known.get("flat")), "columns": known["columns"]}
        index = SamplesIndex(path)
        return {"stamp": index.stamp, "flat": index.flat, "columns": index.columns}

    def distrust(self, run: str) -> None:
        """`run`'s index cannot be read: its run is traced from the views."""
        if self.found is not None:
            self.found.pop(run, None)
        self.all_indexed = False
