"""tracking/samples_index.parquet: every effective sample of a run sorted by example_id, so `trace` reads a row group
or two instead of unnesting every batch. Written at the end of training (track/index.py, `write_samples_index`); read
here, by `Runs.trace`, while it still covers exactly the run's parts on disk.
"""

from __future__ import annotations

import bisect
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from loratrace.query.parts import file_key

INDEX_ROW_GROUP = 8192  # rows per row group of the samples index: a trace decodes one or two of them
TRACE_COLUMNS = ("run_id", "example_id", "line", "step", "epoch", "micro_batch", "rank", "position", "loss", "p_gold",
                 "correct", "lr", "checkpoint_step", "checkpoint_path", "first")
TRACE_ORDER = "run_id, step, micro_batch, rank, position"
INDEX_FILE = "samples_index.parquet"  # tracking/<this>: example_trace sorted by example_id, written at the end
INDEX_KEY = b"loratrace.index"


class SamplesIndex:
    """An open samples index: its footer parsed once and each row group's example_id range, so a trace decodes only
    the row group or two that can hold the id (the file is sorted by example_id)."""

    def __init__(self, path):
        self.file = pq.ParquetFile(path if isinstance(path, (str, os.PathLike)) else path.open())  # or a RemotePath
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
        ids = table.column("example_id").to_pylist()  # sorted; not pc.equal, whose Python scalar imports pandas
        start = bisect.bisect_left(ids, example_id)
        return table.slice(start, bisect.bisect_right(ids, example_id) - start)


def index_fingerprint(run_dir: Path, files: dict[str, list[str]]) -> list[str]:
    """What a samples index covers: the run's batch, attempt and checkpoint parts (it holds each step's checkpoint),
    by name."""
    prefix = str(run_dir / "tracking") + "/"
    return sorted(f[len(prefix):] for view in ("batches_raw", "attempts_raw", "checkpoints_raw") for f in files[view]
                  if f.startswith(prefix))


class Indexes:
    """The runs whose samples index covers exactly their parts on disk now (found when `trace` needs them, forgotten
    at each listing that changes the parts), and each index opened once per version of its file."""

    def __init__(self):
        self.found: dict | None = None  # run_id -> its index (a Path or RemotePath)
        self.all_indexed = False  # every tracked run has one: `trace` reads no view
        self._open: dict[str, tuple[tuple, SamplesIndex]] = {}  # path -> (stat when opened, reader)

    def find(self, run_dirs: list[Path], files: dict[str, list[str]]) -> dict:
        if self.found is not None:
            return self.found
        self.found = {}
        tracked = 0
        for run_dir in run_dirs:
            parts = index_fingerprint(run_dir, files)
            if not parts:
                continue  # nothing tracked in this folder
            tracked += 1
            try:
                stamp = self.open(run_dir / "tracking" / INDEX_FILE).stamp
            except (OSError, KeyError, TypeError, ValueError):
                continue
            if stamp and stamp["parts"] == parts:
                self.found[stamp["run_id"]] = run_dir / "tracking" / INDEX_FILE
        self.all_indexed = len(self.found) == tracked
        return self.found

    def open(self, path) -> SamplesIndex:
        key = file_key(path.stat())
        cached = self._open.get(str(path))
        if cached is None or cached[0] != key:
            cached = self._open[str(path)] = (key, SamplesIndex(path))
        return cached[1]

    def distrust(self, run: str) -> None:
        """`run`'s index cannot be read: its run is traced from the views."""
        if self.found is not None:
            self.found.pop(run, None)
        self.all_indexed = False
