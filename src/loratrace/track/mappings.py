"""The two mappings the old tooling kept as JSON, as Parquet: step -> checkpoint and (example, line) -> checkpoints.

`Mappings` keeps an index of the effective lineage in memory and reads only the parts it has not read yet, so a
refresh at every checkpoint save costs milliseconds, not a re-read of the whole run:

    mappings = Mappings(run_dir / "tracking", run_id, lineage_ranges(run_dir / "tracking"))   # track/lineage.py
    mappings.refresh()                       # now: -> step_checkpoint.parquet, line_checkpoint.parquet
    mappings.refresh_when_due(written)       # at a save: on its own thread, within its share of the wall time

`first_checkpoint` is the rule both files follow: a step's rows are in the first checkpoint saved at or after it.
"""

from __future__ import annotations

import bisect
import time
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from loratrace.track import schema
from loratrace.track.writer import BackgroundWriter


def first_checkpoint(step: int, saved_steps: list[int]) -> int | None:
    """The step of the first checkpoint that includes update `step`: the first saved at or after it (None: none yet).
    `saved_steps` is sorted."""
    at = bisect.bisect_left(saved_steps, step)
    return saved_steps[at] if at < len(saved_steps) else None


def step_checkpoint_table(run_id: str, steps: Iterable[int], checkpoints: dict[int, str]) -> pa.Table:
    """step_checkpoint rows (run_id, step, checkpoint_step, checkpoint_path) for `steps`, given the run's effective
    checkpoints as step -> path."""
    steps = _sorted_unique(np.fromiter(steps, np.int64))
    checkpoint, at = _first_checkpoints(steps, checkpoints)
    return pa.Table.from_arrays([pa.array([run_id] * len(steps), pa.string()), pa.array(steps), checkpoint,
                                 _paths(checkpoints).take(at)], schema=schema.STEP_CHECKPOINT)


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique by a sort: numpy's own (by hashing) is several times slower on millions of distinct values."""
    values = np.sort(values)
    return values[np.append(True, values[1:] != values[:-1])] if len(values) else values


def _first_checkpoints(steps: np.ndarray, checkpoints: dict[int, str]) -> tuple[pa.Array, pa.Array]:
    """`first_checkpoint` of each step (null: none yet), and its place among the checkpoints in step order."""
    saved = np.array(sorted(checkpoints), np.int64)
    at = np.searchsorted(saved, steps, side="left")
    none = at >= len(saved)
    checkpoint = saved[np.minimum(at, len(saved) - 1)] if len(saved) else np.zeros(len(steps), np.int64)
    return pa.array(checkpoint, mask=none), pa.array(at, mask=none)


def _paths(checkpoints: dict[int, str]) -> pa.Array:
    return pa.array([checkpoints[step] for step in sorted(checkpoints)], pa.string())


class Mappings:
    refresh_share = 0.02
    """While training, refreshes take at most this share of wall time (`refresh_when_due`); `refresh` always runs."""

    def __init__(self, tracking_dir: Path, run_id: str, ranges: dict[int, tuple[int, int | None]]):
        self.directory = Path(tracking_dir)
        self.run_id = run_id
        self.ranges = ranges
        self._read: set[str] = set()
        self._steps = np.zeros(0, np.int64)  # the effective steps indexed, sorted
        # (example_id, line, step) of the effective samples indexed, in chunks; the ids as dictionary arrays
        self._trained: list[pa.Table] = []
        self._checkpoints: dict[int, str] = {}  # step -> path
        self._finished_at: float | None = None
        self._duration = 0.0
        self._worker = BackgroundWriter("loratrace-mappings")

    @property
    def cpu_s(self) -> float:
        """CPU time of the refreshes run on the mappings' own thread."""
        return self._worker.cpu_s

    def refresh_when_due(self, parts_written: Future) -> None:
        """Refresh on the mappings' own thread, after `parts_written`, if the last refresh is over and the time since
        it ended keeps refreshing within `refresh_share` of the wall time. The seed saves every update: a refresh
        each time would compete with the step for the CPU."""
        due = self._finished_at is None or time.monotonic() - self._finished_at >= self._duration / self.refresh_share
        if due and self._worker.idle():
            self._worker.submit(_after, parts_written, self.refresh)

    def close(self) -> None:
        """Wait for a refresh in flight. One that failed is a warning: the files are derived, `refresh` redoes them."""
        try:
            self._worker.close()
        except Exception as error:  # noqa: BLE001 - training goes on; the next refresh rewrites both files
            warnings.warn(f"loratrace: refreshing the tracking mappings failed: {error}", stacklevel=2)

    def _effective(self, part: pa.Table) -> np.ndarray:
        """Which rows of `part` are in the effective lineage (track.lineage.is_effective, for every row at once)."""
        attempts, steps = part["attempt"].fill_null(-1).to_numpy(), part["step"].to_numpy()
        keep = np.zeros(len(steps), bool)
        for attempt, (lower, upper) in self.ranges.items():
            keep |= (attempts == attempt) & (steps > lower) & (True if upper is None else steps <= upper)
        return keep

    def _new_parts(self, folder: str, columns: list[str]) -> Iterator[pa.Table]:
        """The effective rows of each part not read yet."""
        for path in schema.tracker_parts(self.directory / folder):
            key = f"{folder}/{path.name}"
            if key in self._read:
                continue
            self._read.add(key)
            with pq.ParquetFile(path) as file:  # not pq.read_table: its dataset layer costs more than the read
                part = file.read(columns=columns)
            yield part.filter(self._effective(part))

    def update(self) -> None:
        """Index the parts written since the last call (every rank's; orphaned rows are skipped)."""
        for part in self._new_parts("batches", ["attempt", "step", "example_ids", "lines"]):
            self._index_batches(part)
        for part in self._new_parts("checkpoints", ["attempt", "step", "path"]):
            for row in part.to_pylist():
                # two files at one step (a ModelCheckpoint's too): the first by name, as the step_checkpoint view
                self._checkpoints[row["step"]] = min(row["path"], self._checkpoints.get(row["step"], row["path"]))

    def add_written(self, names: Iterable[str], batches: pa.Table) -> None:
        """Index batch rows still in memory, as written to the parts `names` (in tracking/batches/): those parts are
        not read back. import-legacy writes every row of its one attempt and keeps them."""
        self._read.update(f"batches/{name}" for name in names)
        effective = self._effective(batches)
        self._index_batches(batches if effective.all() else batches.filter(effective))

    def _index_batches(self, part: pa.Table) -> None:
        steps = part["step"].to_numpy()
        self._steps = _sorted_unique(np.concatenate([self._steps, steps]))
        lengths = pc.list_value_length(part["example_ids"]).fill_null(0).to_numpy()
        self._trained.append(pa.table({"example_id": pc.dictionary_encode(pc.list_flatten(part["example_ids"])),
                                       "line": pc.list_flatten(part["lines"]), "step": np.repeat(steps, lengths)}))

    def tables(self) -> tuple[pa.Table, pa.Table]:
        """(step_checkpoint, line_checkpoint) for what is indexed: for each step its `first_checkpoint`; for each
        (example_id, line) every step it trained at and the first checkpoint including each."""
        step_map = step_checkpoint_table(self.run_id, self._steps, self._checkpoints)
        trained, starts = _grouped(self._trained)
        self._trained = [trained]  # the next refresh sorts only what is new since
        steps = trained["step"].to_numpy()
        checkpoint, at = _first_checkpoints(steps, self._checkpoints)
        heads, offsets = pa.array(starts), pa.array(np.append(starts, len(steps)), pa.int32())
        line_map = pa.Table.from_arrays([
            pa.array([self.run_id] * len(starts), pa.string()), trained["example_id"].take(heads).cast(pa.string()),
            trained["line"].take(heads), pa.ListArray.from_arrays(offsets, pa.array(steps)),
            pa.ListArray.from_arrays(offsets, checkpoint), pa.array(steps[starts]), checkpoint.take(heads),
            _paths(self._checkpoints).take(at.take(heads))], schema=schema.LINE_CHECKPOINT)
        return step_map, line_map

    def refresh(self) -> tuple[pa.Table, pa.Table]:
        """Index new parts, then rewrite both files atomically (they are derived, not parts: replaced, not added).
        Returns what was written: (step_checkpoint, line_checkpoint)."""
        started = time.monotonic()
        self.update()
        step_map, line_map = self.tables()
        schema.write_atomic(step_map, self.directory / "step_checkpoint.parquet")
        schema.write_atomic(line_map, self.directory / "line_checkpoint.parquet")
        self._finished_at = time.monotonic()
        self._duration = self._finished_at - started
        return step_map, line_map


def _grouped(chunks: list[pa.Table]) -> tuple[pa.Table, np.ndarray]:
    """The (example_id, line, step) rows of `chunks` each once, by line, then id (a null one, an imported legacy index
    that is no row of the data set, after the others), then step; and where each (example_id, line) starts."""
    if not sum(chunk.num_rows for chunk in chunks):
        return pa.table({"example_id": pa.array([], pa.dictionary(pa.int32(), pa.string())),
                         "line": pa.array([], pa.int64()), "step": pa.array([], pa.int64())}), np.zeros(0, np.int64)
    trained = pa.concat_tables(chunks).unify_dictionaries().combine_chunks()
    ids, lines = trained["example_id"].chunk(0), trained["line"].chunk(0)
    by_text = pc.sort_indices(ids.dictionary)
    rank = np.empty(len(by_text), np.int64)
    rank[by_text.to_numpy()] = np.arange(len(rank))  # the ids' order as text, by code
    id_rank = np.append(rank, len(rank))[ids.indices.fill_null(len(rank)).to_numpy()]  # a null id last
    line_null, line, id_rank, steps = _unique_rows(lines.is_null().to_numpy(zero_copy_only=False),
                                                   lines.fill_null(0).to_numpy(), id_rank,
                                                   trained["step"].to_numpy(), len(rank) + 1)
    starts = np.flatnonzero(np.append(True, (line_null[1:] != line_null[:-1]) | (line[1:] != line[:-1])
                                      | (id_rank[1:] != id_rank[:-1])))
    codes = pa.array(id_rank, pa.int32(), mask=id_rank == len(rank))
    return pa.table({"example_id": pa.DictionaryArray.from_arrays(codes, ids.dictionary.take(by_text)),
                     "line": pa.array(line, mask=line_null), "step": steps}), starts


def _unique_rows(line_null: np.ndarray, line: np.ndarray, id_rank: np.ndarray, steps: np.ndarray,
                 ids: int) -> tuple[np.ndarray, ...]:
    """The rows (line_null, line, id_rank, step) each once, sorted in that order. Rows already in step order (one
    attempt's, as written) are grouped by counting (`_unique_stepped`): by line alone where each line holds one id
    (an imported run's), else by (line, id) while their range is small; others by one packed integer per row when the
    ranges allow (a sort of one column), else by np.lexsort of the four."""
    known = line[~line_null]
    low, high = (int(known.min()), int(known.max())) if len(known) else (0, 0)
    first_step, step_span = int(steps.min()), int(steps.max()) - int(steps.min()) + 1
    null_line = high - low + 1  # the packed line of a null one: after every line
    slot = np.where(line_null, null_line, line - low)
    pairs = (null_line + 1) * ids  # the packed (line, id) keys
    counted = max(2**20, len(steps))  # the most keys counted (np.bincount's array)
    if null_line < counted and (steps[1:] >= steps[:-1]).all():
        one_id = np.zeros(null_line + 1, np.int64)
        one_id[slot] = id_rank
        if (one_id[slot] == id_rank).all():  # each line holds one id: the line alone is the key
            slot, steps = _unique_stepped(slot, steps, null_line + 1)
            return slot == null_line, np.where(slot == null_line, 0, slot + low), one_id[slot], steps
        if pairs <= counted:
            key, steps = _unique_stepped(slot * ids + id_rank, steps, pairs)
            slot, id_rank = np.divmod(key, ids)
            return slot == null_line, np.where(slot == null_line, 0, slot + low), id_rank, steps
    if pairs * step_span < 2**63:
        packed = _sorted_unique((slot * ids + id_rank) * step_span + (steps - first_step))
        rest, steps = np.divmod(packed, step_span)
        line, id_rank = np.divmod(rest, ids)
        return line == null_line, np.where(line == null_line, 0, line + low), id_rank, steps + first_step
    order = np.lexsort((steps, id_rank, line, line_null))
    keys = np.stack([line_null[order], line[order], id_rank[order], steps[order]])
    first = order[np.append(True, (keys[:, 1:] != keys[:, :-1]).any(axis=0))]  # a row that is not the one before it
    return line_null[first], line[first], id_rank[first], steps[first]


def _unique_stepped(key: np.ndarray, steps: np.ndarray, keys: int) -> tuple[np.ndarray, np.ndarray]:
    """The (key, step) rows each once, by key then step, for rows in step order with each key < `keys`: the keys
    numbered densely by counting, then a stable sort of those numbers (by radix when they fit 16 bits) keeps each
    key's steps in order, so a repeated row is next to its twin."""
    counts = np.bincount(key, minlength=keys)
    present = counts > 0
    codes = (np.cumsum(present) - 1).astype(np.uint16 if present.sum() <= 2**16 else np.int64)[key]
    steps = steps[np.argsort(codes, kind="stable")]
    codes = np.repeat(np.arange(len(counts[present])), counts[present])  # sorted: each key's code, its count times
    kept = np.append(True, (codes[1:] != codes[:-1]) | (steps[1:] != steps[:-1]))
    return np.flatnonzero(present)[codes[kept]], steps[kept]


def _after(done: Future, fn, *args) -> None:
    done.result()
    fn(*args)
