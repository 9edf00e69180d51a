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
from collections.abc import Iterable
from concurrent.futures import Future
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from loratrace.track import schema
from loratrace.track.lineage import is_effective
from loratrace.track.writer import BackgroundWriter


def first_checkpoint(step: int, saved_steps: list[int]) -> int | None:
    """The step of the first checkpoint that includes update `step`: the first saved at or after it (None: none yet).
    `saved_steps` is sorted."""
    at = bisect.bisect_left(saved_steps, step)
    return saved_steps[at] if at < len(saved_steps) else None


def step_checkpoint_table(run_id: str, steps: Iterable[int], checkpoints: dict[int, str]) -> pa.Table:
    """step_checkpoint rows (run_id, step, checkpoint_step, checkpoint_path) for `steps`, given the run's effective
    checkpoints as step -> path."""
    saved = sorted(checkpoints)
    rows = []
    for step in sorted(set(steps)):
        checkpoint = first_checkpoint(step, saved)
        rows.append({"run_id": run_id, "step": step, "checkpoint_step": checkpoint,
                     "checkpoint_path": checkpoints.get(checkpoint)})
    return pa.Table.from_pylist(rows, schema=schema.STEP_CHECKPOINT)


class Mappings:
    refresh_share = 0.02
    """While training, refreshes take at most this share of wall time (`refresh_when_due`); `refresh` always runs."""

    def __init__(self, tracking_dir: Path, run_id: str, ranges: dict[int, tuple[int, int | None]]):
        self.directory = Path(tracking_dir)
        self.run_id = run_id
        self.ranges = ranges
        self._read: set[str] = set()
        self._steps: set[int] = set()
        self._trained: dict[tuple[str, int], set[int]] = {}
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

    def _effective(self, attempt: int, step: int) -> bool:
        return is_effective(self.ranges, attempt, step)

    def _new_parts(self, folder: str, columns: list[str]) -> list[dict]:
        rows = []
        for path in schema.tracker_parts(self.directory / folder):
            key = f"{folder}/{path.name}"
            if key in self._read:
                continue
            self._read.add(key)
            rows += pq.read_table(path, columns=columns).to_pylist()
        return rows

    def update(self) -> None:
        """Index the parts written since the last call (every rank's; orphaned rows are skipped)."""
        for row in self._new_parts("batches", ["attempt", "step", "example_ids", "lines"]):
            if self._effective(row["attempt"], row["step"]):
                self._steps.add(row["step"])
                for example_id, line in zip(row["example_ids"], row["lines"]):
                    self._trained.setdefault((example_id, line), set()).add(row["step"])
        for row in self._new_parts("checkpoints", ["attempt", "step", "path"]):
            if self._effective(row["attempt"], row["step"]):
                # two files at one step (a ModelCheckpoint's too): the first by name, as the step_checkpoint view
                self._checkpoints[row["step"]] = min(row["path"], self._checkpoints.get(row["step"], row["path"]))

    def tables(self) -> tuple[pa.Table, pa.Table]:
        """(step_checkpoint, line_checkpoint) for what is indexed: for each step its `first_checkpoint`; for each
        (example_id, line) every step it trained at and the first checkpoint including each."""
        step_map = step_checkpoint_table(self.run_id, self._steps, self._checkpoints)
        checkpoint_of = dict(zip(step_map["step"].to_pylist(), step_map["checkpoint_step"].to_pylist()))
        line_rows = []
        for (example_id, line), steps in sorted(self._trained.items(), key=_by_line_then_id):
            ordered = sorted(steps)
            checkpoints = [checkpoint_of[s] for s in ordered]
            line_rows.append({"run_id": self.run_id, "example_id": example_id, "line": line, "steps": ordered,
                              "checkpoint_steps": checkpoints, "first_step": ordered[0],
                              "first_checkpoint_step": checkpoints[0],
                              "first_checkpoint_path": self._checkpoints.get(checkpoints[0])})
        return step_map, pa.Table.from_pylist(line_rows, schema=schema.LINE_CHECKPOINT)

    def refresh(self) -> None:
        """Index new parts, then rewrite both files atomically (they are derived, not parts: replaced, not added)."""
        started = time.monotonic()
        self.update()
        step_map, line_map = self.tables()
        schema.write_atomic(step_map, self.directory / "step_checkpoint.parquet")
        schema.write_atomic(line_map, self.directory / "line_checkpoint.parquet")
        self._finished_at = time.monotonic()
        self._duration = self._finished_at - started


def _by_line_then_id(item: tuple[tuple[str | None, int | None], set]) -> tuple:
    """Sort key of an indexed (example_id, line): by line, then id; a null one (an imported legacy index that is no
    row of the data set) after the others."""
    (example_id, line), _ = item
    return (line is None, line or 0, example_id is None, example_id or "")


def _after(done: Future, fn, *args) -> None:
    done.result()
    fn(*args)
