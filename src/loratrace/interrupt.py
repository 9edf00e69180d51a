"""Stopping a run cleanly on SIGTERM (a scheduler's pre-emption) or Ctrl+C (SIGINT).

The first signal asks for a stop at the end of the current update: `StopOnSignal` saves a checkpoint there (one
process; under several, every rank stops together through Lightning's own SIGTERM handling, at the last checkpoint),
the tracker flushes as on any exception, run.json says `interrupted`, and the command exits 128 + the signal's number
(130, 143) with one line naming the checkpoint to resume from. A second Ctrl+C aborts at once.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from loratrace.errors import LoratraceError


class RunInterrupted(LoratraceError):
    """A run stopped by a signal; its state on disk is resumable."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopOnSignal(Callback):
    """Turns SIGINT into the same clean stop as SIGTERM and remembers which one came; `save(trainer, step)` writes the
    stop's checkpoint (`StepCheckpoint.save`)."""

    def __init__(self, checkpoint_dir: Path, save: Callable[[L.Trainer, int], Path]):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.save = save
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._step_before_batch = -1

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        self._previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt  # the second Ctrl+C: no more waiting
        self.signum = self.signum or signum
        if signum == signal.SIGINT:
            print("\nloratrace: stopping after this update (Ctrl+C again to abort)", file=sys.stderr, flush=True)
        lightning_handler = self._previous.get(signal.SIGTERM)
        if callable(lightning_handler):  # Lightning's: it stops the loop on every rank after this batch
            lightning_handler(signal.SIGTERM, frame)

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self._step_before_batch = trainer.global_step

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.signum is None or step == self._step_before_batch or trainer.world_size > 1:
            return  # no stop asked, mid-accumulation, or several ranks that must agree on a collective save
        if not any(self.checkpoint_dir.glob(f"checkpoint-step-{step:03d}.ckpt")):
            self.save(trainer, step)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.restore()

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.restore()

    def restore(self) -> None:
        """Put back the SIGINT handler that was there before training (Lightning puts back SIGTERM's itself)."""
        handler = self._previous.pop(signal.SIGINT, None)
        if handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, handler)


def interrupted_message(signum: int, step: int, checkpoint_dir: Path) -> str:
    written = sorted(Path(checkpoint_dir).glob("checkpoint-step-*.ckpt"))
    resume = (f"resume with: loratrace train --resume-from-checkpoint {written[-1]}" if written
              else "no checkpoint was written yet; start the run again")
    return f"interrupted by {signal.Signals(signum).name} after step {step}; {resume}"
