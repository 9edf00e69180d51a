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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from loratrace.query.damage import gaps
from loratrace.query.manifest import INDEX_ENTRY, MANIFEST_FILE, manifest_text, stamp_of
from loratrace.query.parts import TABLES
from loratrace.query.samples_index import (
    INDEX_FILE,
    INDEX_KEY,
    INDEX_ROW_GROUP,
    INDEX_SCHEMA,
    TRACE_ORDER,
    SamplesIndex,
    index_fingerprint,
)
from loratrace.query.store import Runs, StoreError
from loratrace.query.views import TRACE_SELECT
from loratrace.runs import storage
from loratrace.track import schema


def write_samples_index(run_dir: str | Path, rows: pa.Table | None = None) -> Path:
    """tracking/samples_index.parquet: every effective sample with its trace columns and the rest of the `samples`
    view's (INDEX_COLUMNS), sorted by example_id in row groups of `INDEX_ROW_GROUP` rows, so `trace` reads one row
    group instead of unnesting every batch, and the views read the run's samples flat. Stamped with the parts it
    covers: a run that trains on (or is resumed) falls back to its batches until the index is rewritten. `rows`:
    the same rows already computed (`index_rows`), written instead of the views' query."""
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
            if rows is None:
                db.con.execute(f"""
                    COPY (SELECT {TRACE_SELECT}, s.attempt, s.batch_idx, s.stage
                          FROM samples s JOIN example_checkpoint e USING (run_id, example_id, line, step)
                          ORDER BY example_id, {TRACE_ORDER})
                    TO '{str(tmp).replace("'", "''")}'
                    (FORMAT parquet, ROW_GROUP_SIZE {INDEX_ROW_GROUP}, COMPRESSION zstd,
                     KV_METADATA {{'{INDEX_KEY.decode()}': '{json.dumps(stamp).replace("'", "''")}'}})""")
            else:  # the same layout: row groups, compression, the stamp in the footer
                with pq.ParquetWriter(tmp, rows.schema, store_schema=False, compression="zstd",
                                      use_dictionary=schema.text_columns(rows.schema)) as writer:
                    writer.write_table(rows, row_group_size=INDEX_ROW_GROUP)
                    writer.add_key_value_metadata({INDEX_KEY: json.dumps(stamp)})
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)  # a failed COPY leaves no partial file
        storage.publish(target)
        write_manifest(run_dir, db.files, db.parts.checked, target, stamp)
    return target


def index_rows(batches: pa.Table, step_map: pa.Table) -> pa.Table:
    """The rows `write_samples_index`'s query selects, for a run whose every batch row is effective (one attempt,
    as import-legacy writes it), from its batches and step_checkpoint tables in memory: no unnesting and no sort of
    the ids as text by DuckDB (tests/legacy compares both). A sample with a null id or line is left out: the query's
    join matches no null. Texts are dictionary arrays (written as text: `write_samples_index` stores no Arrow
    schema), so no text is copied per sample."""
    order = np.lexsort([batches[name].to_numpy() for name in ("rank", "micro_batch", "step")])
    if (order != np.arange(len(order))).any():  # taking the lists again costs: only when not in order already
        batches = batches.take(order)
    lengths = pc.list_value_length(batches["example_ids"]).fill_null(0).to_numpy()
    row_of = np.repeat(np.arange(len(lengths)), lengths)  # flat, the samples are in TRACE_ORDER already
    position = np.arange(len(row_of)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    ids, lines = (pc.list_flatten(batches[name]).combine_chunks() for name in ("example_ids", "lines"))
    encoded = pc.dictionary_encode(ids)
    rank = np.empty(len(encoded.dictionary) + 1, np.int32)
    rank[pc.sort_indices(encoded.dictionary).to_numpy()] = np.arange(len(rank) - 1)  # byte order, as DuckDB's
    codes = rank[encoded.indices.fill_null(-1).to_numpy()]  # a null id: -1, the last of `rank`, a row not kept
    kept = None if not (ids.null_count or lines.null_count) else np.flatnonzero(
        pc.and_(ids.is_valid(), lines.is_valid()).to_numpy(zero_copy_only=False))
    # by id, then as they were: a stable sort, by radix when the codes fit 16 bits
    kind = np.int16 if len(rank) <= 2**15 else np.int32
    order = (np.argsort(codes.astype(kind), kind="stable") if kept is None
             else kept[np.argsort(codes[kept].astype(kind), kind="stable")])
    codes = codes[order]
    rows, lines = row_of[order], lines.fill_null(-1).to_numpy()[order]  # a kept sample has a line
    steps = batches["step"].to_numpy()
    at = np.searchsorted(step_map["step"].to_numpy(), steps)[rows]  # each sample's row of step_map
    steps = steps[rows]
    by_text = encoded.dictionary.take(pc.sort_indices(encoded.dictionary))  # code i: the i-th id in that order
    columns = {"example_id": pa.DictionaryArray.from_arrays(pa.array(codes), by_text), "line": pa.array(lines),
               "position": pa.array(position[order]),
               "checkpoint_step": step_map["checkpoint_step"].take(at),
               "checkpoint_path": _dictionary(step_map["checkpoint_path"], at),
               "first": pa.array(_first(codes, lines, steps))}
    for name, flat in (("loss", "losses"), ("p_gold", "p_gold"), ("correct", "correct")):
        columns[name] = _per_sample(batches[flat], lengths).take(order)
    computed = set(columns)
    for name in set(INDEX_SCHEMA.names) - computed:
        columns[name] = _dictionary(batches[name], rows) if name == "run_id" else batches[name].take(rows)
    # a column of the batch is "not null" where no part holds a null, as DuckDB writes it (from the parts' statistics)
    fields = [pa.field(f.name, columns[f.name].type if f.type == pa.string() else f.type,
                       f.name in computed or batches[f.name].null_count > 0) for f in INDEX_SCHEMA]
    return pa.Table.from_arrays([columns[f.name].cast(f.type) for f in fields], schema=pa.schema(fields))


def _dictionary(texts: pa.ChunkedArray, at: np.ndarray) -> pa.DictionaryArray:
    """`texts.take(at)` as a dictionary array."""
    encoded = pc.dictionary_encode(texts.combine_chunks())
    indices = encoded.indices.take(at)
    return pa.DictionaryArray.from_arrays(indices, encoded.dictionary)


def _first(codes: np.ndarray, lines: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Whether each sample (sorted by id code, then step) is at the first step of its (example_id, line)."""
    same_id = codes[1:] == codes[:-1]
    together = (lines[1:] == lines[:-1])[same_id].all()  # each id at one line: its samples are already together
    order = None if together else np.lexsort((lines, codes))  # stable: by step in each
    if order is not None:
        codes, lines, steps = codes[order], lines[order], steps[order]
    starts = np.append(True, (codes[1:] != codes[:-1]) | (lines[1:] != lines[:-1]))
    at_start = steps[np.maximum.accumulate(np.where(starts, np.arange(len(steps)), 0))]  # each group's first step
    if order is None:
        return steps == at_start
    first = np.empty(len(steps), bool)
    first[order] = steps == at_start
    return first


def _per_sample(lists: pa.ChunkedArray, lengths: np.ndarray) -> pa.Array:
    """A batch column of one value per sample (losses, p_gold, correct), one per sample: null where the batch has
    none."""
    kind, lists = lists.type.value_type, lists.combine_chunks()
    if not lists.null_count < len(lists):
        return pa.nulls(int(lengths.sum()), kind)
    has = np.repeat(lists.is_valid().to_numpy(zero_copy_only=False), lengths)
    return pc.replace_with_mask(pa.nulls(len(has), kind), pa.array(has), pc.list_flatten(lists))


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
