"""Writing off the training step: `BackgroundWriter`, one thread that writes files in the order they were handed
over, and `PartWriter`, the tracking parts of one attempt on it, each under its name.

    writer = BackgroundWriter("loratrace-tracking")
    writer.submit(schema.write_atomic, table, path)   # returns at once
    writer.wait()                                     # every write handed over is on disk; a failed one raises here
    writer.close()                                    # the same, and the thread ends (a later submit starts another)

It counts the CPU time its thread spends (`cpu_s`): off the step's path, but it competes with training for cores.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa

from loratrace.runs.folder import utc_now
from loratrace.track import schema


class BackgroundWriter:
    def __init__(self, name: str):
        self.name = name
        self.cpu_s = 0.0  # added to by the writer thread only
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []

    def submit(self, fn: Callable, *args) -> Future:
        """Queue `fn(*args)` behind every write handed over before it."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.name)
        # Finished writes are forgotten, failed ones kept until `wait` reports them.
        self._pending = [f for f in self._pending if not f.done() or f.exception() is not None]
        future = self._pool.submit(self._timed, fn, *args)
        self._pending.append(future)
        return future

    def written(self) -> Future:
        """A future that is done once every write handed over so far is."""
        return self.submit(lambda: None)

    def idle(self) -> bool:
        return all(f.done() for f in self._pending)

    def wait(self) -> None:
        """Block until every write handed over is done; re-raise the first that failed."""
        futures, self._pending = self._pending, []
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            raise errors[0]

    def close(self) -> None:
        """Wait for every write, end the thread; re-raise the first write that failed."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.shutdown(wait=True)
        self.wait()

    def _timed(self, fn: Callable, *args) -> None:
        start = time.thread_time()
        try:
            fn(*args)
        finally:
            self.cpu_s += time.thread_time() - start


class PartWriter:
    """The parts one attempt writes under `tracking/` on one rank, each under its name, on a `BackgroundWriter`:

        attempts/a{attempt:03d}.parquet, examples.parquet (once per run),
        batches/a{attempt:03d}-r{rank:02d}-{n:06d}.parquet, checkpoints/a{attempt:03d}-s{step:09d}[-k].parquet

    (`-k` only for a second file saved at the same step, by another checkpoint callback). Each part is complete when
    it appears (`schema.write_atomic`) and never rewritten.
    """

    def __init__(self, directory: str | Path, run_id: str, attempt: int = 0, rank: int = 0):
        self.directory, self.run_id, self.attempt, self.rank = Path(directory), run_id, attempt, rank
        self._thread = BackgroundWriter("loratrace-tracking")
        self._batch_parts = 0
        self._checkpoint_parts: dict[int, int] = {}  # step -> parts written for it

    def attempt_row(self, row: dict) -> None:
        self._write([row], self.directory / "attempts" / schema.attempts_part_name(self.attempt), schema.ATTEMPTS)

    def examples(self, rows: list[dict]) -> None:
        if not (self.directory / schema.EXAMPLES_FILE).exists():  # a resume keeps the first launch's
            self._write(rows, self.directory / schema.EXAMPLES_FILE, schema.EXAMPLES)

    def batches(self, rows: list[dict]) -> None:
        name = schema.batches_part_name(self.attempt, self.rank, self._batch_parts)
        self._batch_parts += 1
        self._write(rows, self.directory / "batches" / name, schema.BATCHES)

    def checkpoints(self, step: int, files: list[tuple[str, int]]) -> None:
        """One row per checkpoint file saved at `step`: (path relative to the run folder, bytes)."""
        now = utc_now()
        rows = [{"run_id": self.run_id, "attempt": self.attempt, "step": step, "path": path, "bytes": size,
                 "created_at": now} for path, size in files]
        count = self._checkpoint_parts.get(step, 0)
        self._checkpoint_parts[step] = count + 1
        name = schema.checkpoints_part_name(self.attempt, step, count)
        self._write(rows, self.directory / "checkpoints" / name, schema.CHECKPOINTS)

    def _write(self, rows: list[dict], path: Path, table_schema: pa.Schema) -> None:
        self._thread.submit(_write_rows, rows, path, table_schema)

    @property
    def cpu_s(self) -> float:
        return self._thread.cpu_s

    def written(self) -> Future:
        return self._thread.written()

    def wait(self) -> None:
        self._thread.wait()

    def close(self) -> None:
        self._thread.close()


def _write_rows(rows: list[dict], path: Path, table_schema: pa.Schema) -> None:
    """Runs on the writer thread: building the Arrow table is part of the work kept off the step."""
    schema.write_atomic(pa.Table.from_pylist(rows, schema=table_schema), path)
