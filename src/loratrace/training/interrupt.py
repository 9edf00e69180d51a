"""Stopping a run cleanly on SIGTERM (a scheduler's pre-emption) or Ctrl+C (SIGINT).

The first signal asks for a stop at the end of the current update (under gradient accumulation too): `StopOnSignal`
makes sure a checkpoint exists for that step (one process; under several ranks, which must agree on a collective save,
every rank stops together through Lightning's own SIGTERM handling, at the last checkpoint), then hands the stop to
Lightning, which ends the loop. The tracker flushes as on any exception, run.json says `interrupted`, and the command
exits 128 + the signal's number (130, 143) with one line naming the checkpoint to resume from. A second Ctrl+C aborts
at once. A signal that comes while the trainer is still setting up stops it before the first update.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from loratrace.errors import LoratraceError
from loratrace.training.checkpoints import StepCheckpoint, latest_full_checkpoint

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(LoratraceError):
    """A run stopped by a signal; its state on disk is resumable."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopOnSignal(Callback):
    """Records the first SIGINT or SIGTERM and stops training after the update it came in, with `step_checkpoint`'s
    file for that step."""

    def __init__(self, step_checkpoint: StepCheckpoint):
        self.step_checkpoint = step_checkpoint
        self.signum: int | None = None
        self._original: dict[int, object] = {}  # the handlers before training, put back by `restore`
        self._lightning_sigterm = None  # Lightning's SIGTERM handler: it ends the loop after the current batch
        self._forward_at_once = False

    def _main_thread(self) -> bool:
        return threading.current_thread() is threading.main_thread()  # only it may set signal handlers

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._main_thread() and not self._original:
            self._original = {s: signal.getsignal(s) for s in SIGNALS}
            for signum in SIGNALS:
                signal.signal(signum, self._on_signal)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._main_thread():  # Lightning installed its SIGTERM handler since `setup`: ours goes first
            self._lightning_sigterm = signal.getsignal(signal.SIGTERM)
            for signum in SIGNALS:
                signal.signal(signum, self._on_signal)
        self._forward_at_once = trainer.world_size > 1
        if self.signum is not None:  # came during set-up: stop before the first update
            raise SIGTERMException()

    def _on_signal(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt  # the second Ctrl+C: no more waiting
        if self.signum is not None:
            return
        self.signum = signum
        if signum == signal.SIGINT:
            print("\nloratrace: stopping after this update (Ctrl+C again to abort)", file=sys.stderr, flush=True)
        if self._forward_at_once:
            self._forward()

    def _forward(self) -> None:
        if callable(self._lightning_sigterm) and self._lightning_sigterm is not self._on_signal:
            # Lightning logs "[rank: 0] Received SIGTERM: 15" at INFO; the stop is told once, by loratrace's own line
            connector_log = logging.getLogger("lightning.pytorch.trainer.connectors.signal_connector")
            level = connector_log.level
            connector_log.setLevel(logging.WARNING)
            try:
                self._lightning_sigterm(signal.SIGTERM, None)
            finally:
                connector_log.setLevel(level)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.signum is None or self._forward_at_once or not self.step_checkpoint.update_finished(trainer):
            return  # no stop asked, several ranks (already handed to Lightning), or mid-accumulation: finish the update
        # StepCheckpoint runs after every other callback: it saves its own step, unless that would be weights only
        if step not in self.step_checkpoint.steps or step in self.step_checkpoint.weights_only:
            self.step_checkpoint.save(trainer, step, full=True)  # the stop's checkpoint must resume
        self._forward()  # Lightning ends the loop once this batch's hooks are done

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.restore()

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.restore()

    def restore(self) -> None:
        """Put back the handlers from before training (also after Lightning's teardown, which restores its view)."""
        if self._main_thread():
            for signum, handler in self._original.items():
                if handler is not None:
                    signal.signal(signum, handler)


def checkpoint_to_resume(run_dir: Path, step: int, last_saved: Path | None, world_size: int,
                         resumed_from: Path | None) -> Path | None:
    """The checkpoint an interrupted message names. One process: the stop's own full save (`last_saved`). Several:
    Lightning's stop wrote none and the last saved may be weights-only, so the run's latest full checkpoint at or
    before `step`. Else the one this launch resumed from, else None."""
    if world_size > 1:
        return latest_full_checkpoint(run_dir, step) or resumed_from
    return last_saved or resumed_from


def interrupted_message(signum: int, step: int, checkpoint: Path | None) -> str:
    """`checkpoint`: this launch's last file, else the one it resumed from, else None."""
    resume = (f"resume with: loratrace train --resume-from-checkpoint {checkpoint}" if checkpoint is not None
              else "no checkpoint was written yet; start the run again")
    return f"interrupted by {signal.Signals(signum).name} after step {step}; {resume}"
