"""Written at the end of a run (by `loratrace.train`, `recipe.py`, and `import-legacy`): tracking/samples_index.parquet,
every effective sample of the run sorted by example_id, computed by the views themselves (docs/ARCHITECTURE.md,
"Query layer"), and tracking/manifest.json, the run's parts as they are then; query/samples_index.py and
query/manifest.py read them. The tracker itself never reaches into the query layer: whoever ends
the run calls `index_samples`."""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

from loratrace.query.damage import gaps
from loratrace.query.manifest import INDEX_ENTRY, MANIFEST_FILE, manifest_text, stamp_of
from loratrace.query.parts import TABLES
from loratrace.query.samples_index import (
    INDEX_FILE,
    INDEX_KEY,
    INDEX_ROW_GROUP,
    TRACE_ORDER,
    SamplesIndex,
    index_fingerprint,
)
from loratrace.query.store import Runs, StoreError
from loratrace.query.views import TRACE_SELECT
from loratrace.runs import storage


def write_samples_index(run_dir: str | Path) -> Path:
    """tracking/samples_index.parquet: every effective sample with its trace columns and the rest of the `samples`
    view's (INDEX_COLUMNS), sorted by example_id in row groups of `INDEX_ROW_GROUP` rows, so `trace` reads one row
    group instead of unnesting every batch, and the views read the run's samples flat. Stamped with the parts it
    covers: a run that trains on (or is resumed) falls back to its batches until the index is rewritten."""
    run_dir = Path(run_dir).resolve()
    with Runs([run_dir]) as db:
        run_id = db.con.sql("SELECT any_value(run_id) FROM batches_raw").fetchall()[0][0]
        if run_id is None:
            raise StoreError(f"{run_dir} has no tracked batches to index")
        parts = index_fingerprint(run_dir, db.files)
        # "files": each part's size and time, so that the views read the index flat only while no part was rewritten
        stamp = {"run_id": run_id, "parts": parts, "gaps": gaps(db.con).get(run_id, []),
                 "files": {name: stamp_of(os.stat(run_dir / "tracking" / name)) for name in parts}}
        target = run_dir / "tracking" / INDEX_FILE
        tmp = target.parent / f".tmp-{target.name}.partial"
        try:
            db.con.execute(f"""
                COPY (SELECT {TRACE_SELECT}, s.attempt, s.batch_idx, s.stage
                      FROM samples s JOIN example_checkpoint e USING (run_id, example_id, line, step)
                      ORDER BY example_id, {TRACE_ORDER})
                TO '{str(tmp).replace("'", "''")}'
                (FORMAT parquet, ROW_GROUP_SIZE {INDEX_ROW_GROUP}, COMPRESSION zstd,
                 KV_METADATA {{'{INDEX_KEY.decode()}': '{json.dumps(stamp).replace("'", "''")}'}})""")
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)  # a failed COPY leaves no partial file
        storage.publish(target)
        write_manifest(run_dir, db.files, db.parts.checked, target, stamp)
    return target


def write_manifest(run_dir: Path, files: dict[str, list[str]], checked: dict[str, tuple], index: Path,
                   stamp: dict) -> Path:
    """tracking/manifest.json (query/manifest.py): each part of the run the views read, with its size, time and
    footer columns (`checked`: as the views' own check read them), and the samples index with its stamp, so opening
    the run reads no footer while they are unchanged."""
    tracking = run_dir / "tracking"
    prefix = str(tracking) + "/"
    entries: dict[str, dict] = {}
    for view in TABLES:
        for part in files[view]:
            if part.startswith(prefix) and checked.get(part, (None, None))[1] is not None:
                entries[part[len(prefix):]] = {"file": stamp_of(os.stat(part)), "columns": checked[part][1]}
    opened = SamplesIndex(index)
    entries[INDEX_ENTRY] = {"file": stamp_of(index.stat()), "stamp": stamp, "flat": opened.flat,
                            "columns": opened.columns}
    target = tracking / MANIFEST_FILE
    tmp = tracking / f".tmp-{MANIFEST_FILE}.partial"
    try:
        tmp.write_text(manifest_text(stamp["run_id"], entries))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    storage.publish(target)
    return target


def index_samples(run_dir: Path) -> float:
    """For whoever ends a run: `tracking/samples_index.parquet`, the per-example index `trace` reads. Returns the
    seconds it took."""
    started = time.perf_counter()
    try:  # where DuckDB cannot be imported, tracking (pyarrow only) keeps every row; `trace` reads the views instead
        import duckdb  # noqa: F401
    except ImportError as error:
        warnings.warn(f"loratrace: samples index not written ({error})", stacklevel=2)
    else:
        write_samples_index(run_dir)
    return time.perf_counter() - started
