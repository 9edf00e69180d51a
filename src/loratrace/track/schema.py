"""Arrow schemas of the files under `tracking/` (docs/ARCHITECTURE.md, "Tracking data"), and the atomic part writer.

Each file carries `loratrace.schema_version` in its Parquet metadata; readers can refuse what they don't know.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from loratrace.errors import LoratraceError
from loratrace.runs import storage


class DamagedPart(LoratraceError):
    """A tracking part (or file) a command must read that cannot be read as the tracker wrote it."""

SCHEMA_VERSION = "1"

BATCHES = pa.schema([
    ("run_id", pa.string()),
    ("attempt", pa.int32()),
    ("step", pa.int64()),
    ("micro_batch", pa.int32()),
    ("rank", pa.int32()),
    ("epoch", pa.int32()),
    ("batch_idx", pa.int64()),
    ("stage", pa.int8()),
    ("example_ids", pa.list_(pa.string())),
    ("lines", pa.list_(pa.int64())),
    ("losses", pa.list_(pa.float32())),
    ("p_gold", pa.list_(pa.float32())),
    ("correct", pa.list_(pa.bool_())),
    ("loss", pa.float32()),
    ("grad_norm", pa.float32()),
    ("lr", pa.float64()),
    ("n_tokens", pa.int64()),
    ("n_target_tokens", pa.int64()),
    ("wall_time", pa.timestamp("us", tz="UTC")),
])

EXAMPLES = pa.schema([
    ("run_id", pa.string()),
    ("example_id", pa.string()),
    ("line", pa.int64()),
    ("split", pa.string()),
    ("dataset", pa.string()),
    ("gold", pa.string()),
    ("n_choices", pa.int32()),
    ("n_target_tokens", pa.int32()),
    ("prompt_sha256", pa.string()),
    ("prompt", pa.string()),  # the formatted prompt, so a checkpoint can be paired with the text that trained it
])

CHECKPOINTS = pa.schema([
    ("run_id", pa.string()),
    ("attempt", pa.int32()),
    ("step", pa.int64()),
    ("path", pa.string()),
    ("bytes", pa.int64()),
    ("created_at", pa.timestamp("us", tz="UTC")),
])

ATTEMPTS = pa.schema([
    ("run_id", pa.string()),
    ("attempt", pa.int32()),
    ("parent_attempt", pa.int32()),  # the attempt that wrote the checkpoint resumed from; null for a fresh start
    ("started_at", pa.timestamp("us", tz="UTC")),
    ("resumed_from", pa.string()),
    ("resumed_step", pa.int64()),
    ("world_size", pa.int32()),
    ("host", pa.string()),
])

STEP_CHECKPOINT = pa.schema([
    ("run_id", pa.string()),
    ("step", pa.int64()),
    ("checkpoint_step", pa.int64()),
    ("checkpoint_path", pa.string()),
])

LINE_CHECKPOINT = pa.schema([
    ("run_id", pa.string()),
    ("example_id", pa.string()),
    ("line", pa.int64()),
    ("steps", pa.list_(pa.int64())),
    ("checkpoint_steps", pa.list_(pa.int64())),  # first checkpoint including each step, same order (null: none yet)
    ("first_step", pa.int64()),
    ("first_checkpoint_step", pa.int64()),
    ("first_checkpoint_path", pa.string()),
])

EVALS = pa.schema([
    ("run_id", pa.string()),
    ("checkpoint_step", pa.int64()),
    ("checkpoint_path", pa.string()),
    ("split", pa.string()),
    ("scoring", pa.string()),
    ("example_id", pa.string()),
    ("line", pa.int64()),
    ("gold", pa.string()),
    ("pred", pa.string()),
    ("correct", pa.bool_()),
    ("p_gold", pa.float32()),
    ("choice_logliks", pa.list_(pa.float32())),  # per choice, in choice order
    ("evaluated_at", pa.timestamp("us", tz="UTC")),
])

INFLUENCE = pa.schema([
    ("run_id", pa.string()),
    ("method", pa.string()),  # tracin or tracin-cp
    ("test_split", pa.string()),
    ("test_example_id", pa.string()),
    ("test_line", pa.int64()),
    ("train_example_id", pa.string()),
    ("train_line", pa.int64()),
    ("step", pa.int64()),  # tracin: the training step t whose batch held the example; tracin-cp: the checkpoint's step
    ("checkpoint_step", pa.int64()),  # the weights the gradients were taken at (tracin: t - 1)
    ("checkpoint_path", pa.string()),
    ("lr", pa.float64()),
    ("score", pa.float64()),  # lr * grad L(train) . grad L(test)
    ("project_dim", pa.int32()),  # null: exact gradients; else the random projection's dimension
    ("computed_at", pa.timestamp("us", tz="UTC")),
])


# `loratrace influence --validate`: one row per (method, test example) of a validation against retraining.
VALIDATIONS = pa.schema([
    ("run_id", pa.string()),
    ("method", pa.string()),  # tracin, tracin-cp, or random (the baseline)
    ("project_dim", pa.int32()),  # null: exact gradients
    ("test_split", pa.string()),
    ("test_example_id", pa.string()),
    ("test_line", pa.int64()),
    ("subsets", pa.int32()),  # M subsets dropped by replay
    ("fraction", pa.float64()),  # of the tail's training examples, per subset
    ("seed", pa.int64()),
    ("from_step", pa.int64()),  # the replays' start (the tail's first full checkpoint) ...
    ("to_step", pa.int64()),  # ... and end (the last checkpoint), where the losses are compared
    ("spearman", pa.float64()),  # this test example's rank correlation of predicted and actual loss changes
    ("lds", pa.float64()),  # the mean of `spearman` over the computation's test examples
    ("lds_low", pa.float64()),  # its 95% bootstrap interval over the test examples
    ("lds_high", pa.float64()),
    ("computed_at", pa.timestamp("us", tz="UTC")),
])


# `influence --validate --loo K`: per test example, its K most helpful and K most harmful training examples (by the
# method's scores), each left out alone by a replay of the tail; `tracking/loo/<method>-<key>.parquet`.
LEAVE_ONE_OUT = pa.schema([
    ("run_id", pa.string()),
    ("method", pa.string()),  # tracin or tracin-cp
    ("project_dim", pa.int32()),  # null: exact gradients
    ("test_split", pa.string()),
    ("test_example_id", pa.string()),
    ("test_line", pa.int64()),
    ("train_example_id", pa.string()),  # the one example left out
    ("kind", pa.string()),  # helpful (highest scores) or harmful (lowest)
    ("rank", pa.int32()),  # 1 = the highest (helpful) or lowest (harmful) score
    ("predicted_change", pa.float64()),  # the method's score: the predicted rise of the test loss without it
    ("actual_change", pa.float64()),  # the replay's test loss minus the run's, at to_step
    ("from_step", pa.int64()),  # the replay's start (the tail's first full checkpoint) ...
    ("to_step", pa.int64()),  # ... and end (the last checkpoint)
    ("computed_at", pa.timestamp("us", tz="UTC")),
])

# A sweep's trials, one row per Optuna trial: `runs/sweeps/<study>/trials.parquet`, a snapshot of the study's storage
# rewritten (atomically) whenever a trial starts or ends; the `trials` view reads it.
TRIALS = pa.schema([
    ("study", pa.string()),
    ("trial", pa.int64()),  # Optuna's trial number, unique in the study
    ("state", pa.string()),  # Optuna's TrialState, lower case: running, complete, pruned, fail, waiting
    ("params", pa.string()),  # JSON, nested like config.yaml: {"lora": {"r": 8}, "training": {...}}
    ("objective", pa.float64()),  # Optuna's value (a pruned trial: its last intermediate value); null if none
    ("objective_name", pa.string()),  # eval_accuracy, final_loss
    ("direction", pa.string()),  # maximize, minimize
    ("intermediate_values", pa.list_(pa.struct([("step", pa.int64()), ("value", pa.float64())]))),
    ("run_id", pa.string()),  # the trial's run folder's name (null until it exists)
    ("run_dir", pa.string()),
    ("retry_of", pa.int64()),  # the trial this one continues (its worker was killed or interrupted)
    ("started_at", pa.timestamp("us", tz="UTC")),
    ("completed_at", pa.timestamp("us", tz="UTC")),
])
TRIALS_FILE = "trials.parquet"

COMPRESS_FROM_BYTES = 64 * 1024

# Columns added after the first release: an older tracker's file lacks them, and the views read them as NULL.
LATER_COLUMNS = frozenset({"prompt"})


def part_problem(found: pa.Schema, expected: pa.Schema) -> str | None:
    """What keeps a file (its footer's schema: the data is not read) from being read as a part of `expected`: a
    column missing or of another type. Extra columns are ignored. None when it reads."""
    for field in expected:
        index = found.get_field_index(field.name)
        if index < 0 and field.name in LATER_COLUMNS and field.name not in found.names:
            continue
        if index < 0:
            return f"no {field.name} column" if field.name not in found.names else f"two {field.name} columns"
        if not found.field(index).type.equals(field.type):
            return f"column {field.name} is {found.field(index).type}, expected {field.type}"
    return None


def write_atomic(table: pa.Table, path: Path) -> None:
    """Write next to `path` under a name no reader globs (`.tmp-*`), then rename into place: a reader sees the
    whole file or nothing. In a run staged for object storage the file is then PUT there (storage.publish)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           b"loratrace.schema_version": SCHEMA_VERSION.encode()})
    tmp = path.parent / f".tmp-{uuid.uuid4().hex}-{path.name}.partial"
    small = table.nbytes < COMPRESS_FROM_BYTES
    try:
        if small:
            # The one-row parts of a checkpoint save: zstd's per-column set-up would dominate the write, and one
            # `write` of bytes encoded in memory is cheaper than writing through a path (figures: bench/RESULTS.md).
            buffer = pa.BufferOutputStream()
            pq.write_table(table, buffer, compression="none")
            with open(tmp, "wb") as file:
                file.write(buffer.getvalue())
        else:  # texts by dictionary; numbers plain: a dictionary of millions of steps costs time and bytes
            pq.write_table(table, tmp, compression="zstd", use_dictionary=text_columns(table.schema))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    storage.publish(path)


def text_columns(kinds: pa.Schema) -> list[str]:
    """The columns holding text, alone or in a list (the Parquet column paths `use_dictionary` names)."""
    texts = []
    for field in kinds:
        listed = pa.types.is_list(field.type) or pa.types.is_large_list(field.type)
        kind = field.type.value_type if listed else field.type
        if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_dictionary(kind):
            texts.append(f"{field.name}.list.element" if listed else field.name)
    return texts


# ---------------------------------------------------------------------------------------------- part file names
# The names the tracker (and `loratrace eval`) write under tracking/, and the only names the query layer reads: any
# other file in these folders is foreign (a copy, an editor's backup, a half-finished download) and is ignored.

EXAMPLES_FILE = "examples.parquet"


def batches_part_name(attempt: int, rank: int, part: int) -> str:
    return f"a{attempt:03d}-r{rank:02d}-{part:06d}.parquet"


def checkpoints_part_name(attempt: int, step: int, count: int = 0) -> str:
    """`count`: a second and later part for the same step (another checkpoint callback saving at that step too)."""
    return f"a{attempt:03d}-s{step:09d}{f'-{count}' if count else ''}.parquet"


def attempts_part_name(attempt: int) -> str:
    return f"a{attempt:03d}.parquet"


def evals_part_name(checkpoint_step: int, evaluated_at, token: str) -> str:
    """`evaluated_at`: a datetime; `token`: 8 hex digits that keep two evaluations in the same second apart."""
    return f"s{checkpoint_step:09d}-{evaluated_at:%Y%m%dT%H%M%S}-{token}.parquet"


def influence_part_name(method: str, key: str, step: int) -> str:
    """`key`: 8 hex digits naming the computation (method, test examples, projection): a rerun finds its parts."""
    return f"{method}-{key}-s{step:09d}.parquet"


def validations_part_name(method: str, key: str) -> str:
    """`key`: 8 hex digits naming the validation (method, test examples, subsets, fraction, seed, projection, span)."""
    return f"{method}-{key}.parquet"



def loo_part_name(method: str, key: str) -> str:
    """`key`: 8 hex digits naming the computation (method, test examples, K, projection, span)."""
    return f"{method}-{key}.parquet"

PART_NAMES = {  # folder under tracking/ -> the names written there (more digits once a counter outgrows its width)
    "batches": re.compile(r"a\d{3,}-r\d{2,}-\d{6,}\.parquet"),
    "checkpoints": re.compile(r"a\d{3,}-s\d{9,}(-\d+)?\.parquet"),
    "attempts": re.compile(r"a\d{3,}\.parquet"),
    "evals": re.compile(r"s\d{9,}-\d{8}T\d{6}-[0-9a-f]{8}\.parquet"),
    "influence": re.compile(r"(tracin|tracin-cp)-[0-9a-f]{8}-s\d{9,}\.parquet"),
    "validations": re.compile(r"(tracin|tracin-cp|random)-[0-9a-f]{8}\.parquet"),
    "loo": re.compile(r"(tracin|tracin-cp)-[0-9a-f]{8}\.parquet"),
}


def tracker_parts(folder: Path) -> list[Path]:
    """The parts the tracker wrote in `folder` (one of PART_NAMES' folders), sorted by name; nothing else."""
    pattern = PART_NAMES[Path(folder).name]
    return sorted(p for p in Path(folder).glob("*.parquet") if pattern.fullmatch(p.name)) if Path(folder).is_dir() \
        else []


def step_spans(steps: list[int]) -> list[list[int]]:
    """Sorted steps as [first, last] runs of consecutive steps: [5, 6, 7, 8, 12] -> [[5, 8], [12, 12]]."""
    spans: list[list[int]] = []
    for step in steps:
        if spans and step == spans[-1][1] + 1:
            spans[-1][1] = step
        else:
            spans.append([step, step])
    return spans


def step_ranges_text(steps: list[int]) -> str:
    """Sorted steps as short ranges: [5, 6, 7, 8, 12] -> "5-8, 12"."""
    return spans_text(step_spans(steps))


def spans_text(spans) -> str:
    """[first, last] spans of steps as text: [[5, 8], [12, 12]] -> "5-8, 12" (the store's gap warning, the resume
    check's refusal)."""
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
