"""Written at the end of a run (by `loratrace.train`, `recipe.py`, and `import-legacy`): tracking/samples_index.parquet,
every effective sample of the run sorted by example_id, computed by the views themselves (docs/ARCHITECTURE.md,
"Query layer"); query/samples_index.py reads it. The tracker itself never reaches into the query layer: whoever ends
the run calls `index_samples`."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from loratrace.query.samples_index import (
    INDEX_FILE,
    INDEX_KEY,
    INDEX_ROW_GROUP,
    TRACE_COLUMNS,
    TRACE_ORDER,
    index_fingerprint,
)
from loratrace.query.store import Runs, StoreError
from loratrace.runs import storage


def write_samples_index(run_dir: str | Path) -> Path:
    """tracking/samples_index.parquet: every effective sample with its trace columns, sorted by example_id in row
    groups of `INDEX_ROW_GROUP` rows, so `trace` reads one row group instead of unnesting every batch. Stamped with
    the parts it covers: a run that trains on (or is resumed) falls back to the views until the index is rewritten."""
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


def index_samples(run_dir: Path) -> float:
    """For whoever ends a run: `tracking/samples_index.parquet`, the per-example index `trace` reads. Returns the
    seconds it took."""
    started = time.perf_counter()
    write_samples_index(run_dir)
    return time.perf_counter() - started
