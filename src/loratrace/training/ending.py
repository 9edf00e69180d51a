"""How one launch of a run ends, recorded once: `RunEnding` holds the status the recipe found ("completed",
"interrupted", "failed") and, in the recipe's `finally`, closes the experiment loggers, publishes the run folder and
writes run.json's attempt (rank 0).

    ending = RunEnding(run_dir, rank_zero=True, resumed_step=0, resumed_from=None)
    try:
        ...; ending.trainer, ending.tracker, ending.stop = trainer, tracker, stop; trainer.fit(...)
        ending.complete(...)                    # or ending.status = "interrupted": a callback stopped it early
    except BaseException as error:
        told = ending.failed(error)             # a signal: RunInterrupted; a full disk: DiskFull; else None
        if told is None:
            raise
        raise told from None
    finally:
        ending.close()

Also here: what the ending reports besides the status (the first non-finite loss, a full disk's one line).
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

import lightning as L
import torch
from typing_extensions import override

from loratrace.errors import LoratraceError
from loratrace.runs import folder, storage
from loratrace.track.tracker import BatchTracker
from loratrace.training.checkpoints import UpdateBoundary, checkpoint_files, latest_full_checkpoint
from loratrace.training.interrupt import RunInterrupted, StopOnSignal, checkpoint_to_resume, interrupted_message
from loratrace.training.loggers import close_wandb


class RunEnding:
    """The launch's end, written once by `close`: `status` None until the recipe knows it (a rank other than 0 that
    finished writes nothing); a failure's files are published and run.json written as far as they can be, the
    training error being the one to report."""

    def __init__(self, run_dir: Path, rank_zero: bool, resumed_step: int, resumed_from: Path | None):
        self.run_dir, self.rank_zero = run_dir, rank_zero
        self.resumed_step, self.resumed_from = resumed_step, resumed_from  # what a stop before any update names
        self.status: str | None = None
        self.failing = False  # set by `failed`: what `close` writes may fail without hiding the error
        self.trainer: L.Trainer | None = None
        self.tracker: BatchTracker | None = None
        self.stop: StopOnSignal | None = None
        self.non_finite = NonFiniteLoss()
        self.index_s = 0.0  # the samples index, written at a completed run's end: counted in tracking's cost
        self.facts: dict = {}  # a completed run's: final_loss, trainable_parameters, checkpoints, final_export_step
        self.written: list[str] = []  # its checkpoint files, for the summary
        self.tracking_cost: dict | None = None  # as run.json records it, for the summary

    @property
    def steps(self) -> int:
        return self.trainer.global_step if self.trainer is not None else self.resumed_step

    def complete(self, final_loss: float | None, trainable: int, exported: bool, index_s: float) -> None:
        self.written = [path.name for _, path in checkpoint_files(self.run_dir)]
        self.status, self.index_s = "completed", index_s
        self.facts = {"final_loss": final_loss, "trainable_parameters": trainable, "checkpoints": len(self.written),
                      "final_export_step": self.steps if exported else None}

    def failed(self, error: BaseException) -> LoratraceError | None:
        """The run ends `interrupted` (a signal) or `failed`; returns the one-line error to raise in `error`'s place
        (RunInterrupted naming the checkpoint to resume from, DiskFull), or None to raise `error` itself."""
        signum = self.stop.signum if self.stop is not None else None
        if self.stop is not None:
            self.stop.restore()
        self.status, self.failing = ("interrupted" if signum is not None else "failed"), True
        if signum is not None:
            world_size = self.trainer.world_size if self.trainer is not None else 1
            last = checkpoint_to_resume(self.run_dir, self.steps, self.stop.step_checkpoint.last_saved, world_size,
                                        self.resumed_from)
            return RunInterrupted(interrupted_message(signum, self.steps, last and storage.public(last)), signum)
        if is_disk_full(error):
            return DiskFull(disk_full_message(self.run_dir, error))
        return None

    def cost(self) -> dict:
        if self.tracker is None:
            return {}
        cost = self.tracker.cost()
        cost["end_s"] += self.index_s  # the run's end: the samples index counts as tracking's end
        return {"tracking_cost": cost}

    def close(self) -> None:
        """Loggers closed (every rank), then on rank 0 the run folder published and run.json's attempt written."""
        if self.trainer is not None:
            finish_swanlab(self.trainer)
            close_wandb(self.trainer.loggers)
        if not self.rank_zero or self.status is None:
            return
        cost = self.cost()
        self.tracking_cost = cost.get("tracking_cost")
        with contextlib.suppress(Exception) if self.failing else contextlib.nullcontext():
            storage.publish_tree(self.run_dir)  # logs and exports, before run.json says how the run ended
        self.facts.update(self.non_finite.facts())  # one read of the flag kept on the device
        with contextlib.suppress(OSError) if self.failing else contextlib.nullcontext():  # a full disk may refuse
            folder.finish_run(self.run_dir, self.status, cost, steps=self.steps, **self.facts)  # run.json too


def finish_swanlab(trainer: L.Trainer) -> None:
    """Close SwanLab's run now, not at interpreter exit: its closing lines would follow the summary, and a second run
    in the same process (`--dataset a --dataset b`) needs the first one finished."""
    if trainer.is_global_zero and any(type(logger).__name__ == "SwanLabLogger" for logger in trainer.loggers):
        import swanlab  # optional (logging.swanlab): imported only when a SwanLab logger ran

        swanlab.finish()


class NonFiniteLoss(UpdateBoundary):
    """The first update whose loss was not finite (NaN, inf): kept on the device and read once at the end, so finding it
    costs no sync per step. run.json then says `non_finite_loss_at_step`."""

    def __init__(self):
        self._first: torch.Tensor | None = None  # 0 while every loss was finite

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        step = trainer.global_step if self.update_finished(trainer) else trainer.global_step + 1
        if self._first is None:
            self._first = torch.zeros((), dtype=torch.long, device=loss.device)
        self._first = torch.where((self._first == 0) & ~torch.isfinite(loss.detach()), step, self._first)

    def facts(self) -> dict:
        """For run.json; null when the loss stayed finite (replacing what an earlier attempt said)."""
        step = int(self._first) if self._first is not None else 0
        return {"non_finite_loss_at_step": step or None}


class DiskFull(LoratraceError):
    """The run's file system filled up while training; the run is `failed` and resumes once there is room."""

    exit_code = 1


def is_disk_full(error: BaseException | None) -> bool:
    """ENOSPC (or a full quota) anywhere in the error's chain; safetensors reports it in its own error's text."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if type(error).__name__ == "SafetensorError" and any(
                mark in str(error) for mark in ("No space left", "StorageFull", "os error 28")):
            return True
        error = error.__cause__ or error.__context__
    return False


def disk_full_message(run_dir: Path, error: BaseException) -> str:
    mount = Path(run_dir).resolve()
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    filename = getattr(error, "filename", None)
    writing = f" writing {filename}" if filename else f" writing into {run_dir}"
    last = latest_full_checkpoint(run_dir)
    then = (f"resume with: loratrace train --resume-from-checkpoint {storage.public(last)}" if last is not None
            else "start the run again")
    return f"no space left on the file system at {mount} ({writing.strip()}); the run failed: free space, then {then}"
