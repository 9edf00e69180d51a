"""The lineage rule, in one place: which tracked rows are effective, when a resume went back and trained steps again.

Every launch of a run is an attempt (`tracking/attempts/`); a resume from a checkpoint starts a new attempt whose
`parent_attempt` wrote that checkpoint. Walking back from the latest attempt gives each attempt on the chain the
steps it owns, (lo, hi]; a row of an attempt off the chain, or past its range, was trained on and then discarded
(orphaned). docs/ARCHITECTURE.md, "Lineage", tells the story; the query layer's views apply the same ranges in SQL.

    ranges = lineage_ranges(run_dir / "tracking")          # attempt -> (lo, hi]
    is_effective(ranges, attempt, step)                     # a row's verdict
    missing_lineage_steps(run_dir / "tracking", 100)        # holes in the effective history (the resume check)
    abandoned_checkpoint_steps(run_dir / "tracking")        # checkpoint files a resume went back from

pyarrow only: the query layer reads through it without torch.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from loratrace.errors import first_line
from loratrace.track import schema

Ranges = dict[int, tuple[int, int | None]]


def effective_ranges(attempts: list[dict]) -> Ranges:
    """attempt -> (lo, hi], the steps whose rows from that attempt are effective.

    Walk back from the latest attempt through `parent_attempt` (the attempt that wrote the checkpoint it resumed
    from). Each attempt owns the steps after its `resumed_step` up to where its child took over; rows of attempts off
    this chain, or past their range, were trained on but discarded: orphaned.
    """
    by_attempt = {int(a["attempt"]): a for a in attempts}
    ranges: Ranges = {}
    current, upper = (max(by_attempt) if by_attempt else None), None
    while current is not None and current in by_attempt and current not in ranges:
        row = by_attempt[current]
        lower = int(row.get("resumed_step") or 0)
        ranges[current] = (lower, upper)
        upper, parent = lower, row.get("parent_attempt")
        current = None if parent is None else int(parent)
    return ranges


def is_effective(ranges: Ranges, attempt: int, step: int) -> bool:
    """Whether `attempt`'s row for `step` is in the effective lineage (`ranges`: effective_ranges)."""
    if attempt not in ranges:
        return False
    lower, upper = ranges[attempt]
    return step > lower and (upper is None or step <= upper)


def read_parts(folder: Path, table_schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
    """Every part the tracker wrote in `folder` (temporary and foreign names are never matched); a part that cannot
    be read as `table_schema` (damaged pages, a column of another type) is one DamagedPart line naming it."""
    tables = []
    for path in schema.tracker_parts(folder):
        try:
            tables.append(pq.read_table(path, schema=table_schema, columns=columns))
        except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ... for a damaged file
            raise schema.DamagedPart(f"{path}: unreadable tracking part ({first_line(exc)}); restore it from a "
                                     "backup") from None
    chosen = table_schema if columns is None else pa.schema([table_schema.field(c) for c in columns])
    return pa.concat_tables(tables) if tables else chosen.empty_table()


def lineage_ranges(tracking_dir: Path, current_attempt: dict | None = None) -> Ranges:
    """The effective ranges of the attempts on disk, plus `current_attempt` (a launch not yet written)."""
    attempts = read_parts(Path(tracking_dir) / "attempts", schema.ATTEMPTS).to_pylist()
    if current_attempt is not None:
        attempts = [a for a in attempts if a["attempt"] != current_attempt["attempt"]] + [current_attempt]
    return effective_ranges(attempts)


def abandoned_checkpoint_steps(tracking_dir: Path) -> set[int]:
    """Steps whose checkpoint rows all come from attempts off the effective lineage: the files there were written by
    an attempt a resume went back from (a step no effective attempt saved again)."""
    rows = read_parts(Path(tracking_dir) / "checkpoints", schema.CHECKPOINTS).to_pylist()
    ranges = lineage_ranges(tracking_dir) if rows else {}
    recorded = {row["step"] for row in rows}
    return recorded - {row["step"] for row in rows if is_effective(ranges, row["attempt"], row["step"])}


def missing_lineage_steps(tracking_dir: Path, up_to_step: int, current_attempt: dict | None = None) -> list[int]:
    """The steps 1..`up_to_step` that no effective row of the `batches` parts covers: a hole in the history (a part
    deleted or lost). `current_attempt` (attempt, parent_attempt, resumed_step): a launch not yet on disk, whose
    lineage is the one to check. The resume check's rule; the `runs` view counts the same holes in SQL
    (missing_steps)."""
    tracking_dir = Path(tracking_dir)
    read_parts(tracking_dir / "attempts", schema.ATTEMPTS)  # a damaged part is named, not a pyarrow traceback
    ranges = lineage_ranges(tracking_dir, current_attempt)
    rows = read_parts(tracking_dir / "batches", schema.BATCHES, ["attempt", "step"])
    present = {step for attempt, step in zip(rows["attempt"].to_pylist(), rows["step"].to_pylist())
               if is_effective(ranges, attempt, step)}
    return [step for step in range(1, up_to_step + 1) if step not in present]
