"""tracking/samples_index.parquet: every effective sample of a run sorted by example_id, so `trace` reads a row group
or two instead of unnesting every batch. Written at the end of training (`write_samples_index`); read by `Runs.trace`
while it still covers exactly the run's parts on disk.
"""

from __future__ import annotations

import bisect
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from loratrace.runs import storage

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


def write_samples_index(run_dir: str | Path) -> Path:
    """tracking/samples_index.parquet: every effective sample with its trace columns, sorted by example_id in row
    groups of `INDEX_ROW_GROUP` rows, so `trace` reads one row group instead of unnesting every batch. Stamped with
    the parts it covers: a run that trains on (or is resumed) falls back to the views until the index is rewritten."""
    from loratrace.query.store import Runs, StoreError  # the views compute what the index holds

    run_dir = Path(run_dir).resolve()
    with Runs([run_dir]) as db:
        run_id = db.con.sql("SELECT any_value(run_id) FROM batches_raw").fetchall()[0][0]
        if run_id is None:
            raise StoreError(f"{run_dir} has no tracked batches to index")
        stamp = json.dumps({"run_id": run_id, "parts": index_fingerprint(run_dir, db.files)})
        target = run_dir / "tracking" / INDEX_FILE
        tmp = target.parent / f".tmp-{target.name}.partial"
        try:
            db.con.execute(f"""
                COPY (SELECT {", ".join(TRACE_COLUMNS)} FROM example_trace ORDER BY example_id, {TRACE_ORDER})
                TO '{str(tmp).replace("'", "''")}'
                (FORMAT parquet, ROW_GROUP_SIZE {INDEX_ROW_GROUP}, COMPRESSION zstd,
                 KV_METADATA {{'{INDEX_KEY.decode()}': '{stamp.replace("'", "''")}'}})""")
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)  # a failed COPY leaves no partial file
    storage.publish(target)
    return target
