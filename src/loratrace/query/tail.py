"""A run's last steps, and each new step as its tracking part lands (`loratrace tail`), read through the query views:
on a run training now, a finished one, or one on object storage; never torch.

    for table in tail_steps("runs/arc-challenge_lora_20260101_120000", last=10, follow=True):
        print(table.select(["step", "loss"]).to_pylist())   # each Arrow table: the steps that landed since the last

A step shows once every rank of the run's latest attempt has written it (the tracker writes whole steps per rank), so
no step shows half its micro-batches; with `follow`, steps show until run.json's status leaves `running` (completed,
failed, interrupted, or `stale`: its process is gone), and then every step written up to that point has shown.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa

from loratrace.query.store import Runs, StoreError, open_runs

# One row per step: the loss token-weighted over its micro-batches and ranks (as the metrics view's train/loss), the
# grad-norm and lr of its update, its examples in rank, micro-batch and batch order.
STEPS = """
    SELECT step, any_value(stage) AS stage, sum(loss * n_target_tokens) / sum(n_target_tokens) AS loss,
           max(grad_norm) AS grad_norm, max(lr) AS lr, sum(len(example_ids))::BIGINT AS examples,
           flatten(list(example_ids ORDER BY rank, micro_batch)) AS example_ids, max(wall_time) AS wall_time
    FROM batches WHERE run_id = $1 AND step > $2 AND step <= $3 GROUP BY step ORDER BY step"""
# The last step every rank of the latest attempt has written (before its first part: the step it resumed from).
COMPLETE = """
    WITH a AS (SELECT attempt, world_size, resumed_step FROM attempts WHERE run_id = $1 ORDER BY attempt DESC LIMIT 1),
         r AS (SELECT rank, max(step) AS step FROM batches
               WHERE run_id = $1 AND attempt = (SELECT attempt FROM a) GROUP BY rank)
    SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM a) THEN (SELECT max(step) FROM batches WHERE run_id = $1)
                WHEN (SELECT count(*) FROM r) >= (SELECT world_size FROM a) THEN (SELECT min(step) FROM r)
                ELSE coalesce((SELECT resumed_step FROM a), 0) END"""
FIRST_OF_LAST = """
    SELECT min(step) FROM (SELECT DISTINCT step FROM batches WHERE run_id = $1 AND step <= $2
                           ORDER BY step DESC LIMIT $3)"""
STEP_COLUMNS = ("step", "stage", "loss", "grad_norm", "lr", "examples", "example_ids", "wall_time")


class TailedRun:
    """One run's steps through an open connection: `status()`, `complete_step()`, `steps(after, upto)`."""

    def __init__(self, db: Runs, where: str, notice: Callable[[str], None] | None = None):
        self.db = db
        runs = db.fetch_table("SELECT * FROM runs ORDER BY created_at DESC NULLS LAST, run_id DESC").to_pylist()
        if not runs:
            raise StoreError(f"no run at {where}")
        if len(runs) > 1 and notice:
            notice(f"{where} holds {len(runs)} runs: showing the newest, {runs[0]['run_id']}")
        self.run_id = runs[0]["run_id"]
        self.tracked = str(runs[0].get("tracking_enabled")).lower() != "false"

    def status(self) -> str | None:
        rows = self.db.fetch_table("SELECT status FROM runs WHERE run_id = $1", [self.run_id]).to_pylist()
        return rows[0]["status"] if rows else None

    def complete_step(self) -> int:
        return self._scalar(COMPLETE, [self.run_id]) or 0

    def first_of_last(self, upto: int, count: int) -> int:
        """The first of the last `count` steps up to `upto` (steps need not be contiguous: a part may be lost)."""
        return self._scalar(FIRST_OF_LAST, [self.run_id, upto, count]) or upto + 1

    def last_step(self) -> int:
        return self._scalar("SELECT max(step) FROM batches WHERE run_id = $1", [self.run_id]) or 0

    def steps(self, after: int, upto: int) -> pa.Table:
        """Steps `after` < step <= `upto`, one row each (STEP_COLUMNS)."""
        return self.db.fetch_table(STEPS, [self.run_id, after, upto])

    def _scalar(self, sql: str, params: list):
        table = self.db.fetch_table(sql, params)
        return table.column(0)[0].as_py() if table.num_rows else None


def tail_steps(run: str | Path, last: int = 10, follow: bool = False, poll_s: float = 1.0,
               notice: Callable[[str], None] | None = None, sleep: Callable[[float], None] = time.sleep
               ) -> Iterator[pa.Table]:
    """The last `last` steps of `run` (a run folder, local or `s3://`; a folder of runs means its newest) as an Arrow
    table of STEP_COLUMNS in step order (maybe empty: nothing written yet); with `follow`, then a table of each poll's
    new complete steps (never empty), until the run stops running. Each step is yielded once."""
    if last < 0:
        raise StoreError(f"-n must be 0 or more, got {last}")
    with open_runs(run, read_only=True) as db:
        tailed = TailedRun(db, str(run), notice)
        if not tailed.tracked:
            raise StoreError(f"run {tailed.run_id} was trained without batch tracking: it has no steps to show "
                             "(train with --track-batches)")
        running = tailed.status() == "running"  # read before the rows: rows written before it changed all show
        upto = tailed.complete_step() if running else tailed.last_step()
        shown = tailed.first_of_last(upto, last) - 1 if last else upto
        yield tailed.steps(shown, upto)  # the last steps (maybe none yet): the run is found and readable
        while follow and running:
            shown = max(shown, upto)
            sleep(poll_s)
            running = tailed.status() == "running"
            upto = max(shown, tailed.complete_step() if running else tailed.last_step())
            if upto > shown:
                table = tailed.steps(shown, upto)
                if table.num_rows:
                    yield table
