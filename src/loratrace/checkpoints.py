"""StepCheckpoint: writes `checkpoints/checkpoint-step-NNN.ckpt` at the steps the two-stage recipe asks for.

Stage 2 saves every `stage2_every_n_steps` updates (the seed: every step, 76..125); stage 1 optionally every
`stage1_every_n_steps`; the last update always. A file is written under a temporary name and renamed into place,
so a crash never leaves a half-written `.ckpt` under the final name. The `BatchTracker`, if present, is told.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from loratrace.config import CheckpointConfig


def checkpoint_name(step: int) -> str:
    return f"checkpoint-step-{step:03d}.ckpt"


def checkpoint_steps(max_steps: int, stage1_steps: int, cfg: CheckpointConfig) -> list[int]:
    steps = set(range(stage1_steps + cfg.stage2_every_n_steps, max_steps + 1, cfg.stage2_every_n_steps))
    if cfg.stage1_every_n_steps:
        steps |= set(range(cfg.stage1_every_n_steps, stage1_steps + 1, cfg.stage1_every_n_steps))
    steps.add(max_steps)
    return sorted(steps)


class StepCheckpoint(Callback):
    def __init__(self, directory: str | Path, steps: list[int]):
        if not steps:
            raise ValueError("StepCheckpoint needs at least one step")
        self.directory = Path(directory)
        self.steps = set(steps)
        self._step_before_batch = -1

    @property
    def state_key(self) -> str:
        return "StepCheckpoint"

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self._step_before_batch = trainer.global_step

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step != self._step_before_batch and step in self.steps:  # this micro-batch finished an update
            self.save(trainer, step)

    def save(self, trainer: L.Trainer, step: int) -> Path:
        from loratrace.tracking import BatchTracker

        path = self.directory / checkpoint_name(step)
        tmp = self.directory / f".{path.name}.partial"
        trackers = [c for c in trainer.callbacks if isinstance(c, BatchTracker)]
        for tracker in trackers:  # their rows are written while Lightning gathers the state and torch serializes it
            tracker.flush()
        trackers = trackers if trainer.is_global_zero else []
        for tracker in trackers:  # waited for below
            tracker.defer_wait = True
        try:
            trainer.save_checkpoint(tmp)  # collective: every rank takes part, rank 0 writes
        finally:
            for tracker in trackers:
                tracker.defer_wait = False
        if trainer.is_global_zero:
            for tracker in trackers:
                tracker.wait()  # the rows this checkpoint includes are on disk before the checkpoint is
            os.replace(tmp, path)
            relative = path.relative_to(self.directory.parent).as_posix()
            for tracker in trackers:
                tracker.record_checkpoint(trainer, step, relative, path.stat().st_size)
            from loratrace.evaluate import CheckpointEvaluator

            for callback in trainer.callbacks:
                if isinstance(callback, CheckpointEvaluator):
                    callback.evaluate(trainer, trainer.lightning_module, step, relative)
        return path


def read_checkpoint(path: Path) -> dict:
    """A `.ckpt` loaded on the CPU, memory-mapped; a truncated or foreign file raises ValueError with one line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, EOFError, UnpicklingError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: not a readable checkpoint ({first})") from None
