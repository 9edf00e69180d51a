"""The two mappings the old tooling kept as JSON, as Parquet: step -> checkpoint and (example, line) -> checkpoints.

`Mappings` keeps an index of the effective lineage in memory and reads only the parts it has not read yet, so a
refresh at every checkpoint save costs milliseconds, not a re-read of the whole run:

    mappings = Mappings(run_dir / "tracking", run_id, ranges)   # ranges: schema.effective_ranges(...)
    mappings.refresh()                                          # -> step_checkpoint.parquet, line_checkpoint.parquet
"""

from __future__ import annotations

import bisect
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from loratrace import schema


class Mappings:
    refresh_share = 0.02
    """While training, refreshes take at most this share of wall time (`due`); the end always refreshes."""

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

    def due(self) -> bool:
        """Whether a refresh now keeps refreshing within `refresh_share` of the time since the last one ended."""
        return self._finished_at is None or time.monotonic() - self._finished_at >= self._duration / self.refresh_share

    def _effective(self, attempt: int, step: int) -> bool:
        if attempt not in self.ranges:
            return False
        lower, upper = self.ranges[attempt]
        return step > lower and (upper is None or step <= upper)

    def _new_parts(self, folder: str, columns: list[str]) -> list[dict]:
        rows = []
        for path in sorted((self.directory / folder).glob("*.parquet")):
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
                self._checkpoints[row["step"]] = row["path"]

    def tables(self) -> tuple[pa.Table, pa.Table]:
        """(step_checkpoint, line_checkpoint) for what is indexed: for each step the first checkpoint whose step is
        >= it; for each (example_id, line) every step it trained at and the first checkpoint including each."""
        saved = sorted(self._checkpoints)

        def first_checkpoint(step: int) -> int | None:
            at = bisect.bisect_left(saved, step)
            return saved[at] if at < len(saved) else None

        step_rows = []
        for step in sorted(self._steps):
            checkpoint = first_checkpoint(step)
            step_rows.append({"run_id": self.run_id, "step": step, "checkpoint_step": checkpoint,
                              "checkpoint_path": self._checkpoints.get(checkpoint)})
        line_rows = []
        for (example_id, line), steps in sorted(self._trained.items(), key=lambda item: (item[0][1], item[0][0])):
            ordered = sorted(steps)
            checkpoints = [first_checkpoint(s) for s in ordered]
            line_rows.append({"run_id": self.run_id, "example_id": example_id, "line": line, "steps": ordered,
                              "checkpoint_steps": checkpoints, "first_step": ordered[0],
                              "first_checkpoint_step": checkpoints[0],
                              "first_checkpoint_path": self._checkpoints.get(checkpoints[0])})
        return (pa.Table.from_pylist(step_rows, schema=schema.STEP_CHECKPOINT),
                pa.Table.from_pylist(line_rows, schema=schema.LINE_CHECKPOINT))

    def refresh(self) -> None:
        """Index new parts, then rewrite both files atomically (they are derived, not parts: replaced, not added)."""
        started = time.monotonic()
        self.update()
        step_map, line_map = self.tables()
        schema.write_atomic(step_map, self.directory / "step_checkpoint.parquet")
        schema.write_atomic(line_map, self.directory / "line_checkpoint.parquet")
        self._finished_at = time.monotonic()
        self._duration = self._finished_at - started


def lineage_ranges(tracking_dir: Path, current_attempt: dict | None = None) -> dict[int, tuple[int, int | None]]:
    """The effective ranges of the attempts on disk, plus `current_attempt` (a launch not yet written)."""
    attempts = read_parts(Path(tracking_dir) / "attempts", schema.ATTEMPTS).to_pylist()
    if current_attempt is not None:
        attempts = [a for a in attempts if a["attempt"] != current_attempt["attempt"]] + [current_attempt]
    return schema.effective_ranges(attempts)


def read_parts(folder: Path, table_schema: pa.Schema) -> pa.Table:
    """Every complete part in `folder` (temporary names are never matched)."""
    paths = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    tables = [pq.read_table(p, schema=table_schema) for p in paths]
    return pa.concat_tables(tables) if tables else table_schema.empty_table()

