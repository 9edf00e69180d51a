"""StepCheckpoint: writes `checkpoints/checkpoint-step-NNN.ckpt` at the steps the two-stage recipe asks for.

Stage 2 saves every `stage2_every_n_steps` updates (the seed: every step, 76..125); stage 1 optionally every
`stage1_every_n_steps`; the last update always. A file is written under a temporary name and renamed into place,
so a crash never leaves a half-written `.ckpt` under the final name.

With `checkpoint.tail=weights` the stage-2 checkpoints between full ones (`weights_only_steps`) hold the LoRA tensors
only: `state_dict` (the same names as a full checkpoint's, so every reader of it works on either kind),
`global_step`, `epoch` and the marker `"loratrace": {"weights_only": True}`. Every file's marker names the run that
wrote it (`"run_id"`): a resume refuses another run's file copied into this run's `checkpoints/`. A resume refuses them
(`nearest_full_checkpoint` names the one to use instead).

Whoever must know about a checkpoint subscribes as a `CheckpointListener`; the writer calls them, they never call
back into it:

    StepCheckpoint(run_dir / "checkpoints", steps, listeners=[tracker, evaluator])

It is a Lightning `Checkpoint`, so Lightning runs its hooks after every other callback's (as it does for
`ModelCheckpoint`): a tracker has taken the micro-batch's row before the save, whatever the order of `callbacks`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Protocol

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, Checkpoint
from typing_extensions import override

from loratrace.config import CheckpointConfig
from loratrace.errors import CheckpointError, first_line
from loratrace.runs import storage
from loratrace.track.lineage import abandoned_checkpoint_steps
from loratrace.training.selection import choose


def checkpoint_name(step: int) -> str:
    return f"checkpoint-step-{step:03d}.ckpt"


def checkpoint_steps(max_steps: int, stage1_steps: int, cfg: CheckpointConfig) -> list[int]:
    steps = set(range(stage1_steps + cfg.stage2_every_n_steps, max_steps + 1, cfg.stage2_every_n_steps))
    if cfg.stage1_every_n_steps:
        steps |= set(range(cfg.stage1_every_n_steps, stage1_steps + 1, cfg.stage1_every_n_steps))
    steps.add(max_steps)
    return sorted(steps)


def weights_only_steps(steps: list[int], stage1_steps: int, max_steps: int, cfg: CheckpointConfig) -> set[int]:
    """The checkpoint steps written as LoRA weights only: with tail=weights, the stage-2 steps before the last that
    cross no multiple of `full_every` since the previous stage-2 checkpoint (the first: since stage 1 ended). So a
    full one comes at least every `full_every` steps whatever `stage2_every_n_steps` is (every 1: the multiples)."""
    if cfg.tail != "weights":
        return set()
    weights_only, previous = set(), stage1_steps
    for step in (s for s in steps if stage1_steps < s < max_steps):
        if step // cfg.full_every == previous // cfg.full_every:
            weights_only.add(step)
        previous = step
    return weights_only


WEIGHTS_ONLY_MARKER = RUN_MARKER = "loratrace"  # one dict: {"run_id": ..., and for a weights-only file "weights_only"}


def is_weights_only(state: dict) -> bool:
    """Whether a loaded checkpoint holds the LoRA weights only (tail=weights), not a resumable state."""
    marker = state.get(WEIGHTS_ONLY_MARKER)
    return isinstance(marker, dict) and bool(marker.get("weights_only"))


class CheckpointListener(Protocol):
    """What a checkpoint writer tells, in this order."""

    def checkpoint_saving(self, trainer: L.Trainer, step: int) -> Callable[[], None] | None:
        """On every rank, before Lightning gathers the state: hand over what the checkpoint must include. A callable
        returned is called on rank 0 before the file appears under its name, and returns once that is durable."""

    def checkpoint_saved(self, trainer: L.Trainer, step: int, path: str, size: int) -> None:
        """On rank 0, once the file is in place: `path` relative to the run folder, `size` in bytes."""


class UpdateBoundary(Callback):
    """A callback that must know, in `on_train_batch_end`, whether the micro-batch now ending finished an optimizer
    update (under gradient accumulation most do not): `update_finished(trainer)`."""

    _step_before_batch = -1

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self._step_before_batch = trainer.global_step

    def update_finished(self, trainer: L.Trainer) -> bool:
        return trainer.global_step != self._step_before_batch


class StepCheckpoint(UpdateBoundary, Checkpoint):
    def __init__(self, directory: str | Path, steps: list[int], listeners: Sequence[CheckpointListener] = (),
                 weights_only: Iterable[int] = (), run_id: str | None = None):
        if not steps:
            raise ValueError("StepCheckpoint needs at least one step")
        self.directory = Path(directory)
        self.run_id = run_id if run_id is not None else self.directory.parent.name  # the run folder's name
        self.steps = set(steps)
        self.weights_only = set(weights_only)  # of `steps`: saved as LoRA weights only
        self._weights_only_now = False
        self._saved_step: int | None = None
        self.last_saved: Path | None = None  # this launch's latest file
        self.listeners = list(listeners)

    @property
    def state_key(self) -> str:
        return "StepCheckpoint"

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.update_finished(trainer) and step in self.steps and step != self._saved_step:
            self.save(trainer, step)  # (a stop's full save at this step came first: it stands)

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # Called last of the callbacks, after the tracker has flushed its rows; the module's hook then keeps only the
        # LoRA tensors of `state_dict` and, seeing the marker, adds no RNG state.
        marker = {"run_id": self.run_id}
        if self._weights_only_now:
            for key in [k for k in checkpoint if k not in ("state_dict", "global_step", "epoch",
                                                           "pytorch-lightning_version")]:
                del checkpoint[key]
            marker.update(weights_only=True, step=trainer.global_step)
        checkpoint[RUN_MARKER] = marker

    def save(self, trainer: L.Trainer, step: int, full: bool = False) -> Path:
        """Write the checkpoint for `step`: weights only if it is one of `weights_only` and not `full`."""
        path = self.directory / checkpoint_name(step)
        self._weights_only_now = step in self.weights_only and not full
        self._saved_step = step
        tmp = self.directory / f".{path.name}.partial"
        # The listeners' writes (the tracker's rows) proceed while Lightning gathers the state and torch serializes it.
        durable = [wait for listener in self.listeners if (wait := listener.checkpoint_saving(trainer, step))]
        try:
            trainer.save_checkpoint(tmp, weights_only=False)  # collective: every rank takes part, rank 0 writes
            if trainer.is_global_zero:
                for wait in durable:
                    wait()  # what this checkpoint includes is on disk before the checkpoint is
                os.replace(tmp, path)
                storage.publish(path)  # a run on object storage: one PUT, after the rows it includes
        finally:
            self._weights_only_now = False
            if trainer.is_global_zero:
                tmp.unlink(missing_ok=True)  # a failed or interrupted save leaves no partial file
        if trainer.is_global_zero:
            self.last_saved = path
            relative = path.relative_to(self.directory.parent).as_posix()
            size = path.stat().st_size
            for listener in self.listeners:
                listener.checkpoint_saved(trainer, step, relative, size)
        return path


def read_checkpoint(path: Path) -> dict:
    """A `.ckpt` loaded on the CPU, memory-mapped; a truncated or foreign file is one CheckpointError line (a
    ValueError: a caller that adds advice catches that)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, EOFError, UnpicklingError, ...
        first = first_line(exc)
        raise CheckpointError(f"{path}: not a readable checkpoint ({first})") from None


def written_by(state: dict) -> str | None:
    """The id of the run that wrote a checkpoint: StepCheckpoint's marker, or for files written before the marker, the
    BatchTracker's saved state; None when it has neither (an untracked run's file of before the marker)."""
    marker = state.get(RUN_MARKER)
    if isinstance(marker, dict) and marker.get("run_id") is not None:
        return marker["run_id"]
    tracked = tracker_state(state)
    return tracked.get("run_id") if isinstance(tracked, dict) else None


def tracker_state(state: dict) -> dict | None:
    """The BatchTracker's saved state (attempt, run_id) in a checkpoint, or None for an untracked launch's."""
    return next((v for k, v in state.get("callbacks", {}).items() if k.startswith("BatchTracker[")), None)


def foreign_writer(state: dict, run_dir: Path, run_id: str | None) -> str | None:
    """The other run that wrote a checkpoint found in `run_dir` (whose run.json says `run_id`), else None. A folder
    renamed since keeps its run.json's run_id, so either name is this run's."""
    writer = written_by(state)
    return writer if writer is not None and writer not in {Path(run_dir).name, run_id} else None


def check_run_checkpoints(run_dir: Path, run_id: str | None, chosen: Iterable[tuple[int, Path]]) -> None:
    """Every chosen checkpoint readable (memory-mapped: the tensors are not read) and written by this run, before a
    command loads a model or starts a progress bar: eval, export and influence fail in one line, having done
    nothing."""
    for _, path in chosen:
        writer = foreign_writer(read_checkpoint(path), run_dir, run_id)
        if writer is not None:
            raise CheckpointError(f"{path}: written by run {writer}, not {run_id or Path(run_dir).name} (copied "
                                      "here?); use the run's own checkpoints")


def checkpoint_files(run_dir: Path) -> list[tuple[int, Path]]:
    """A run's `checkpoint-step-NNN.ckpt` files as (step, path), by step, less those a tracked run's lineage abandoned
    (written by an attempt past the step a resume went back to, and not written again since)."""
    abandoned = abandoned_checkpoint_steps(Path(run_dir) / "tracking")
    found = ((int(p.name[len("checkpoint-step-"):-len(".ckpt")]), p)
             for p in (Path(run_dir) / "checkpoints").glob("checkpoint-step-*.ckpt"))
    return sorted((step, path) for step, path in found if step not in abandoned)


def select_checkpoints(run_dir: Path, text: str, verb: str, final: bool = False,
                       option: str = "--checkpoints") -> list[tuple[int, Path]]:
    """The (step, file) pairs of a run's effective checkpoints that `text` selects, in the one syntax of eval, export
    and influence (training/selection.py); `verb` says what for in "has no checkpoints to <verb>"."""
    return choose(checkpoint_files(run_dir), text, Path(run_dir), verb, final, option)


def latest_full_checkpoint(run_dir: Path, step: int | None = None) -> Path | None:
    """A run's latest resumable checkpoint (at or before `step` if given), or None: what a re-queued trial continues
    from, and what an interrupted message names when another rank's stop wrote none of its own."""
    for other, path in reversed(checkpoint_files(run_dir)):
        if step is not None and other > step:
            continue
        try:
            if not is_weights_only(read_checkpoint(path)):
                return path
        except ValueError:
            continue  # unreadable: not one to resume from
    return None


def nearest_full_checkpoint(run_dir: Path, step: int) -> Path | None:
    """The resumable checkpoint of a run nearest to `step` (the earlier one on a tie), or None: the files are read
    outward from `step`, up to the first full one."""
    for _, path in sorted(checkpoint_files(run_dir), key=lambda found: (abs(found[0] - step), found[0])):
        try:
            if not is_weights_only(read_checkpoint(path)):
                return path
        except ValueError:
            continue  # unreadable: not one to name
    return None
