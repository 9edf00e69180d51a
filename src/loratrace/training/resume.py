"""The resume check: everything a resume reads (the checkpoint, run.json, the tracking history it continues) is read
and judged before anything in the run folder changes, so a refused resume is one line and leaves the run as it was.

    run_dir = resume_run_dir(Path("runs/x/checkpoints/checkpoint-step-090.ckpt"))
    step = validate_resume(checkpoint, module, cfg, world_size)     # CheckpointError / TrackingError / DamagedRun
"""

from __future__ import annotations

from pathlib import Path

from loratrace.config import Config, ConfigError
from loratrace.data.loader import order_mismatch
from loratrace.errors import CheckpointError
from loratrace.runs import storage
from loratrace.runs.folder import read_run_json
from loratrace.track import schema
from loratrace.track.lineage import missing_lineage_steps, read_parts
from loratrace.track.schema import step_ranges_text
from loratrace.track.tracker import TrackingError
from loratrace.training.checkpoints import (
    foreign_writer,
    is_weights_only,
    nearest_full_checkpoint,
    read_checkpoint,
    tracker_state,
)
from loratrace.training.module import LoRAModule, lora_mismatch


def resume_run_dir(checkpoint: Path) -> Path:
    if not checkpoint.is_file():
        raise ConfigError(f"checkpoint {checkpoint} does not exist")
    if checkpoint.parent.name != "checkpoints":
        raise ConfigError(f"{checkpoint} is not inside a run's checkpoints/ folder")
    return checkpoint.parent.parent


def validate_resume(checkpoint: Path, module: LoRAModule, cfg: Config, world_size: int = 1) -> int:
    """The step a resume continues from, once the checkpoint is known to fit: readable, resumable, of this run, LoRA
    tensors of this model's shapes, the same data order (seed, and `world_size` processes however launched), (for a
    tracked run) the tracking history it continues readable and whole up to its step; and short of max_steps."""
    try:
        state = read_checkpoint(checkpoint)
    except ValueError as exc:
        raise CheckpointError(f"{exc}; resume from another checkpoint-step-*.ckpt") from None
    step = int(state.get("global_step", 0))
    if is_weights_only(state):
        full = nearest_full_checkpoint(checkpoint.parent.parent, step)
        instead = f"resume from {storage.public(full)}" if full else "this run has no full checkpoint to resume from"
        raise CheckpointError(f"{checkpoint.name} holds the LoRA weights only (checkpoint.tail=weights) and cannot "
                              f"resume a run; {instead}")
    _check_same_run(checkpoint, state)
    problem = lora_mismatch(module, state.get("state_dict", {}))
    if problem:
        raise CheckpointError(f"checkpoint {problem}")
    loader = _loader_state(state)
    problem = order_mismatch(loader, cfg.training.seed, world_size) if loader else None
    if problem:
        raise CheckpointError(f"{checkpoint.name}: {problem}")
    if cfg.tracking.enabled:
        _check_tracking(checkpoint, state, step)
    if cfg.training.max_steps <= step:  # nothing to train: it would only overwrite the exports with older weights
        raise CheckpointError(f"training.max_steps={cfg.training.max_steps} is not past {checkpoint.name}'s step "
                              f"{step}: the resume would train nothing; resume with training.max_steps above {step}")
    return step


def _check_same_run(checkpoint: Path, state: dict) -> None:
    """A checkpoint resumes the run that wrote it. Its run id: StepCheckpoint's marker, or for files written before
    the marker, the tracker's state key; a file with neither resumes as before. A folder renamed since keeps its
    run.json's run_id, so either name is this run's."""
    run_dir = checkpoint.parent.parent
    info = read_run_json(run_dir)  # checked: a damaged run.json is one DamagedRun line, before any write
    writer = foreign_writer(state, run_dir, info.get("run_id"))
    if writer is not None:
        this_run = info.get("run_id", run_dir.name)
        raise CheckpointError(f"{checkpoint.name} was written by run {writer}, not {this_run} (copied here?); "
                              f"resume run {writer} from its own folder, or this run from one of its checkpoints")


def _check_tracking(checkpoint: Path, state: dict, step: int) -> None:
    """The tracked history this resume continues: its attempt's record on disk, every part it reads readable, and
    every step up to the checkpoint's in the lineage it continues (a lost part would leave a hole in `batches`)."""
    tracked = tracker_state(state)
    tracking = checkpoint.parent.parent / "tracking"
    attempts = read_parts(tracking / "attempts", schema.ATTEMPTS)
    if tracked is not None and \
            not (tracking / "attempts" / schema.attempts_part_name(int(tracked["attempt"]))).exists():
        raise CheckpointError(f"{checkpoint.name} continues tracked attempt {tracked['attempt']}, but its records in "
                              f"{tracking} are gone; resuming would record a false lineage (restore tracking/, or "
                              "resume with tracking.enabled=false)")
    if tracked is None and schema.tracker_parts(tracking / "attempts"):
        raise CheckpointError(f"{checkpoint.name} was written by an untracked launch of a tracked run: tracking from "
                              "it would cut the recorded history off its lineage (resume it with "
                              "tracking.enabled=false, or from a checkpoint a tracked launch wrote)")
    if tracked is None:
        return  # an untracked run's first tracked launch: no history to continue
    read_parts(tracking / "checkpoints", schema.CHECKPOINTS)  # read by the tracker's mappings once it starts
    this_launch = {"attempt": max(attempts["attempt"].to_pylist(), default=-1) + 1,
                   "parent_attempt": int(tracked["attempt"]), "resumed_step": step}
    missing = missing_lineage_steps(tracking, step, this_launch)
    if missing:
        raise TrackingError(f"{tracking / 'batches'} has no rows for step(s) {step_ranges_text(missing)} of the "
                            f"history {checkpoint.name} continues (a part was lost?); restore tracking/, or resume "
                            "with tracking.enabled=false")


def _loader_state(state: dict) -> dict | None:
    """The EpochLoader's saved position (seed, world size), wherever Lightning keeps it."""
    loader = state.get("loops", {}).get("fit_loop", {}).get("state_dict", {}).get("combined_loader")
    if isinstance(loader, list):
        loader = loader[0] if loader else None
    return loader if isinstance(loader, dict) else None
