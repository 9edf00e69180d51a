"""What a run recorded, as `verify` and `replay` read it: the effective micro-batches (the `batches` view's rows:
rows of attempts a rewinding resume abandoned never count) and the checkpoint files, full or weights-only.

    batches = recorded_micro_batches(run_dir)          # [MicroBatch], by (step, micro_batch)
    files = run_checkpoints(run_dir)                   # [RunCheckpoint(step, path, full)], by step
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from loratrace.errors import LoratraceError, first_line
from loratrace.track import schema
from loratrace.track.lineage import is_effective, lineage_ranges, read_parts


class ProofError(LoratraceError):
    """A run, checkpoint or step that `verify`, `replay` or `influence --validate` cannot work from (exit 2)."""


@dataclass
class MicroBatch:
    """One effective `batches` row: what one micro-batch of one update was, as recorded."""

    step: int
    micro_batch: int
    epoch: int
    batch_idx: int
    example_ids: list[str]
    losses: list[float] | None
    loss: float | None
    grad_norm: float | None
    lr: float


@dataclass
class RunCheckpoint:
    step: int
    path: Path
    full: bool  # resumable (optimizer, scheduler, loop, loader and RNG state), not checkpoint.tail=weights


COLUMNS = ["attempt", "step", "micro_batch", "rank", "epoch", "batch_idx", "example_ids", "losses", "loss",
           "grad_norm", "lr"]


def recorded_micro_batches(run_dir: Path) -> list[MicroBatch]:
    """The run's effective micro-batches, by (step, micro_batch). A run trained by several processes is refused:
    re-executing it takes as many."""
    tracking = Path(run_dir) / "tracking"
    if not (tracking / "batches").is_dir():
        raise ProofError(f"{run_dir} has no tracked batches (tracking/batches/): train with --track-batches to be "
                         "able to verify or replay a run")
    ranges = lineage_ranges(tracking)
    rows = read_parts(tracking / "batches", schema.BATCHES, COLUMNS).to_pylist()
    ranks = {row["rank"] for row in rows}
    if ranks - {0}:
        raise ProofError(f"{run_dir} was trained by {len(ranks)} processes; verify and replay re-execute one-process "
                         "runs only")
    found = sorted((MicroBatch(r["step"], r["micro_batch"], r["epoch"], r["batch_idx"], list(r["example_ids"]),
                               r["losses"], r["loss"], r["grad_norm"], r["lr"])
                    for r in rows if is_effective(ranges, r["attempt"], r["step"])),
                   key=lambda m: (m.step, m.micro_batch))
    if not found:
        raise ProofError(f"{run_dir} has no effective tracked batches to re-execute")
    return found


def run_checkpoints(run_dir: Path) -> list[RunCheckpoint]:
    """The run's checkpoint files of its effective lineage, by step, each marked full or weights-only; an unreadable
    file is one line."""
    from loratrace.training.checkpoints import checkpoint_files, is_weights_only, read_checkpoint  # torch

    found = []
    for step, path in checkpoint_files(run_dir):
        try:
            state = read_checkpoint(path)
        except ValueError as exc:
            raise ProofError(str(exc)) from None
        found.append(RunCheckpoint(step, path, not is_weights_only(state)))
    return found


def check_training_data(run_dir: Path, train) -> None:
    """The training split loaded now must be the one the run recorded (examples.parquet), prompt for prompt: a
    re-execution over other prompts would differ at its first step for a reason that is no fault of the record."""
    recorded = Path(run_dir) / "tracking" / schema.EXAMPLES_FILE
    if not recorded.is_file():
        return
    try:
        table = pq.read_table(recorded, columns=["example_id", "line", "prompt_sha256"])
    except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ... for a damaged file
        raise ProofError(f"{recorded}: not a readable examples file ({first_line(exc)})") from None
    then = set(zip(*(table[c].to_pylist() for c in ("example_id", "line", "prompt_sha256"))))
    now = {(e.example_id, e.line, e.prompt_sha256) for e in train}
    if then != now:
        changed = sorted(then ^ now, key=str)[0]
        raise ProofError(f"the training data differs from what {Path(run_dir).name} recorded (example {changed[0]}, "
                         f"line {changed[1]}); restore it first")


def steps_text(first: int, last: int) -> str:
    return f"step {first}" if first == last else f"steps {first}-{last}"
