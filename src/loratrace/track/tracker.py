"""BatchTracker: a Lightning callback that records every micro-batch's examples in Parquet under `tracking/`.

Works in any Lightning loop whose batches carry `example_id` (list of str) and `line` (int tensor or list). The
numbers are what `training_step` returns (`StepOutputs`: `loss`, optionally per-example `losses`, `p_gold`,
`correct`, and `n_tokens`, `n_target`; loratrace's `LoRAModule` returns them all); one not returned is written as
null. A micro-batch whose `training_step` returned None (Lightning skips it) writes no row: its examples did not
train. An update that such a micro-batch ends still counts as a step, without a grad-norm.

    trainer = L.Trainer(callbacks=[BatchTracker("runs/x/tracking", run_id="x")])

Rows are buffered and flushed as new parts (`PartWriter`: temporary name, then `os.replace`, on its own thread,
off the step): every `flush_every_steps` updates, at every checkpoint save, at the end and on exceptions; a part is
never rewritten. Each checkpoint file gets a `checkpoints` row: the tracker listens to loratrace's `StepCheckpoint`
(`StepCheckpoint(..., listeners=[tracker])`) and notices the files Lightning's `ModelCheckpoint` saves (a file that
`save_top_k` later deletes keeps its row). Either way the rows a checkpoint includes are on disk before its file
appears. The attempt number travels in the checkpoint, so a resume starts attempt a+1 and knows its parent.
The samples index `trace` reads is written by whoever ends the run (query/index.py; `loratrace.train` does).

The tracker accounts for its own cost (`cost()`): wall time in its hooks on the training thread, CPU time of its
writer threads, and its end-of-training work; `train` records it in run.json and prints it.
"""

from __future__ import annotations

import functools
import os
import socket
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from typing_extensions import override

from loratrace.errors import LoratraceError
from loratrace.runs import storage
from loratrace.runs.folder import utc_now
from loratrace.track import schema
from loratrace.track.lineage import lineage_ranges, read_parts
from loratrace.track.mappings import Mappings
from loratrace.track.step_outputs import HostValues, gradient_norm, micro_batch_loss, stage_of
from loratrace.track.writer import PartWriter

NUMBERS = ("loss", "losses", "p_gold", "correct", "n_tokens", "n_target")
"""The `StepOutputs` keys a row is made of."""


@dataclass
class _Spent:
    """What tracking cost this launch, in seconds.

    `training_thread_s`: wall time in the tracker's hooks while training; the step waits for it.
    `background_cpu_s`: CPU time of its writer threads; off the step's path, but it competes for cores.
    `end_s`: the end of training (last part, mappings), on the training thread.
    The `*_share` figures divide by `train_wall_s`, training's wall time from its first step to its end."""

    training_thread_s: float = 0.0
    end_s: float = 0.0
    updates: int = 0
    started: float | None = None
    ended: float | None = None
    in_hook: bool = False

    def report(self, background_cpu_s: float) -> dict[str, float | int]:
        wall = (self.ended or time.perf_counter()) - (self.started or time.perf_counter())
        return {"updates": self.updates, "train_wall_s": wall, "training_thread_s": self.training_thread_s,
                "background_cpu_s": background_cpu_s, "end_s": self.end_s,
                "training_thread_share": self.training_thread_s / wall if wall > 0 else 0.0,
                "background_share": background_cpu_s / wall if wall > 0 else 0.0}


def _on_training_thread(hook):
    """Count the hook's wall time as the tracker's cost on the training thread: outermost calls only (hooks that
    call `flush` or `wait` are not counted twice), and none after training ended (that is `end_s`)."""
    @functools.wraps(hook)
    def timed(self, *args, **kwargs):
        spent = self._spent
        if spent.in_hook or spent.ended is not None:
            return hook(self, *args, **kwargs)
        spent.in_hook, start = True, time.perf_counter()
        try:
            return hook(self, *args, **kwargs)
        finally:
            spent.in_hook = False
            spent.training_thread_s += time.perf_counter() - start
    return timed


class BatchTracker(Callback):
    def __init__(self, directory: str | Path, run_id: str, flush_every_steps: int = 50,
                 examples: list[dict] | None = None, stage1_steps: int | None = None):
        if flush_every_steps < 1:
            raise ValueError(f"flush_every_steps must be at least 1, got {flush_every_steps}")
        self.directory = Path(directory)
        self.run_id = run_id
        self.flush_every_steps = flush_every_steps
        self.examples = examples
        self.stage1_steps = stage1_steps
        self.attempt, self.parent_attempt = 0, None
        self._rows = _Rows(run_id, stage1_steps)
        self._update: dict[str, Any] | None = None  # grad-norm and lr of the update this micro-batch ends
        self._last_flush_step = 0
        self._parts = PartWriter(self.directory, run_id)
        self._mappings: Mappings | None = None  # rank 0 only
        self._checkpoints = _CheckpointLog()
        self._spent = _Spent()

    @property
    def state_key(self) -> str:
        return f"BatchTracker[{self.run_id}]"

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"attempt": self.attempt, "run_id": self.run_id}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.parent_attempt = int(state_dict["attempt"])

    # ------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":  # every rank must agree on the attempt number before any rank writes a part
            latest = _next_attempt(self.directory) if trainer.is_global_zero else 0
            self.attempt = self._rows.attempt = self._parts.attempt = int(trainer.strategy.broadcast(latest, src=0))
            self._parts.rank = trainer.global_rank

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._spent.started, self._last_flush_step = time.perf_counter(), trainer.global_step
        if trainer.is_global_zero:
            attempt = _attempt_row(trainer, self.run_id, self.attempt, self.parent_attempt)
            self._parts.attempt_row(attempt)
            if self.examples is not None:
                self._parts.examples([{"run_id": self.run_id, **row} for row in self.examples])
            self._mappings = Mappings(self.directory, self.run_id, lineage_ranges(self.directory, attempt))

    @override
    @_on_training_thread
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._record_checkpoints(*self._checkpoints.saved_elsewhere_since(trainer, self.directory.parent))

    @override
    @_on_training_thread
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        # Callback hooks run before the module's: a module that measures the norm itself (LoRAModule) has not done
        # so yet; its value is read at batch end. Any other module's gradients are measured here, before clipping.
        grad_norm = None if hasattr(pl_module, "grad_norm") else gradient_norm(pl_module.parameters())
        self._update = {"grad_norm": grad_norm, "lr": float(optimizer.param_groups[0]["lr"])}

    @override
    @_on_training_thread
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        update, self._update = self._update, None
        if update is not None and update["grad_norm"] is None:
            update["grad_norm"] = pl_module.grad_norm
        self._rows.add(trainer, outputs, batch, batch_idx, update)
        if update is not None:
            self._spent.updates += 1
            if trainer.global_step - self._last_flush_step >= self.flush_every_steps:
                self.flush()

    @override
    @_on_training_thread
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.flush()  # a crash right after the file appears must not lose the rows it includes
        if self._checkpoints.announced:  # a listener's save: the writer waits itself, just before its file appears
            self._checkpoints.announced = False
            return
        self.wait()
        if trainer.is_global_zero:  # another checkpoint callback's: its file is recorded once it is written
            self._checkpoints.saved_elsewhere_at(trainer.global_step)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._spent.ended = time.perf_counter()
        try:
            self._record_checkpoints(*self._checkpoints.saved_elsewhere_since(trainer, self.directory.parent))
            self.flush()
            self.close()
            trainer.strategy.barrier("loratrace-tracking-end")  # every rank's last part is on disk
            if self._mappings is not None:
                self._mappings.refresh()
        finally:
            self._spent.end_s = time.perf_counter() - self._spent.ended

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        try:  # what was trained up to the failure goes to disk; a write error here must not hide the training error
            self.flush()
            self.close()
        except Exception as error:  # noqa: BLE001
            warnings.warn(f"loratrace: could not write the last tracking rows: {error}", stacklevel=2)
        if self._mappings is not None:  # what was trained up to the failure, for a pandas user
            try:
                self._mappings.refresh()
            except Exception as error:  # noqa: BLE001 - the training error is the one to report
                warnings.warn(f"loratrace: could not refresh the tracking mappings: {error}", stacklevel=2)

    # ------------------------------------------------------------------ a StepCheckpoint listener

    @_on_training_thread
    def checkpoint_saving(self, trainer: L.Trainer, step: int) -> Callable[[], None] | None:
        """Hand the rows to the writer, to be written while the checkpoint is; rank 0's writer waits for them."""
        self.flush()
        if not trainer.is_global_zero:
            return None  # this rank waits in on_save_checkpoint; the save's barrier holds rank 0 until it has
        self._checkpoints.announced = True
        return self.wait

    @_on_training_thread
    def checkpoint_saved(self, trainer: L.Trainer, step: int, path: str, size: int) -> None:
        if trainer.is_global_zero:
            self._record_checkpoints(step, [(path, size)])

    # ------------------------------------------------------------------ rows -> writer

    @_on_training_thread
    def flush(self) -> None:
        """Hand the buffered rows to the writer thread as one new part."""
        rows = self._rows.take()
        if rows:
            self._last_flush_step = max(self._last_flush_step, rows[-1]["step"])
            self._parts.batches(rows)

    @_on_training_thread
    def wait(self) -> None:
        """Block until every part handed to the writer thread is on disk; re-raise the first write error."""
        self._parts.wait()

    def close(self) -> None:
        """Wait for every pending write (re-raising the first error) and for a mapping refresh in flight."""
        try:
            self._parts.close()
        finally:
            if self._mappings is not None:
                self._mappings.close()

    def _record_checkpoints(self, step: int, files: list[tuple[str, int]]) -> None:
        """One `checkpoints` part for the files saved at `step` (rank 0), then the mappings when their budget allows."""
        if files:
            self._parts.checkpoints(step, files)
            if self._mappings is not None:  # the refresh must read the parts queued so far: it waits on its thread
                self._mappings.refresh_when_due(self._parts.written())

    def cost(self) -> dict[str, float | int]:
        """What tracking cost this launch, in seconds (see `_Spent`)."""
        background = self._parts.cpu_s + (self._mappings.cpu_s if self._mappings is not None else 0.0)
        return self._spent.report(background)


class _Rows:
    """The micro-batch rows of one attempt on one rank, waiting for the next part. The newest waits for its numbers,
    read a micro-batch late (`HostValues`): by then their copy to the host is long done, so the step never waits for
    the GPU."""

    def __init__(self, run_id: str, stage1_steps: int | None):
        self.run_id, self.stage1_steps, self.attempt = run_id, stage1_steps, 0
        self._micro_batch = 0  # index under gradient accumulation
        self._complete: list[dict[str, Any]] = []
        self._unread: tuple[dict[str, Any], HostValues] | None = None

    def add(self, trainer: L.Trainer, outputs: Any, batch: Any, batch_idx: int, update: dict | None) -> None:
        """A finished micro-batch; `update` (grad_norm, lr) if it ended an update. Nothing for a skipped one."""
        self._read()
        step = trainer.global_step if update is not None else trainer.global_step + 1
        outputs = outputs if isinstance(outputs, Mapping) else {"loss": outputs}
        if outputs.get("loss") is not None:  # Lightning passes {} for a training_step that returned None
            numbers = {key: outputs[key] for key in NUMBERS if isinstance(outputs.get(key), torch.Tensor)}
            numbers["loss"] = micro_batch_loss(outputs, trainer)  # not the share Lightning back-propagated
            if update is not None and update["grad_norm"] is not None:
                numbers["grad_norm"] = update["grad_norm"]
            lines = batch["line"]
            row = {
                "run_id": self.run_id, "attempt": self.attempt, "step": step, "micro_batch": self._micro_batch,
                "rank": trainer.global_rank, "epoch": int(batch.get("epoch", trainer.current_epoch)),
                "batch_idx": int(batch.get("batch_in_epoch", batch_idx)), "stage": stage_of(step, self.stage1_steps),
                "example_ids": [str(i) for i in batch["example_id"]],
                "lines": lines.tolist() if isinstance(lines, torch.Tensor) else [int(x) for x in lines],
                "lr": update["lr"] if update is not None else float(trainer.optimizers[0].param_groups[0]["lr"]),
                "wall_time": utc_now(),
            }
            self._unread = (row, HostValues(numbers))
        self._micro_batch = 0 if update is not None else self._micro_batch + 1

    def take(self) -> list[dict[str, Any]]:
        self._read()
        rows, self._complete = self._complete, []
        return rows

    def _read(self) -> None:
        if self._unread is not None:
            (row, numbers), self._unread = self._unread, None
            self._complete.append({**row, **_number_columns(numbers.values())})


class _CheckpointLog:
    """Which checkpoint files the tracker has recorded, and saves by other checkpoint callbacks still to record."""

    MTIME_SLACK_NS = 2_000_000_000  # file systems that keep modification times to the second (or two) round down

    def __init__(self):
        self.announced = False  # a listener's save is under way: its writer waits for the rows itself
        self._pending: tuple[int, int] | None = None  # (step, time_ns) of the first unrecorded save elsewhere
        self._recorded: dict[str, tuple[int, int]] = {}  # file -> (mtime_ns, size) when recorded

    def saved_elsewhere_at(self, step: int) -> None:
        if self._pending is None:
            self._pending = (step, time.time_ns())

    def saved_elsewhere_since(self, trainer: L.Trainer, run_dir: Path) -> tuple[int, list[tuple[str, int]]]:
        """(step, [(path relative to the run, bytes)]) of the files Lightning's `ModelCheckpoint` callbacks name as
        saved (last, best, top k: what Lightning's own loggers scan after a save) written since the save noticed
        last; no files when there was none."""
        if self._pending is None:
            return 0, []
        (step, since_ns), self._pending = self._pending, None
        named: set[str] = set()
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint):
                named |= {callback.last_model_path, callback.best_model_path, *callback.best_k_models}
        files = []
        for name in sorted(p for p in named if p and os.path.isfile(p)):
            stat = os.stat(name)
            key = (stat.st_mtime_ns, stat.st_size)
            if stat.st_mtime_ns >= since_ns - self.MTIME_SLACK_NS and self._recorded.get(name) != key:
                self._recorded[name] = key
                files.append((Path(os.path.relpath(os.path.abspath(name), run_dir.resolve())).as_posix(), stat.st_size))
        return step, files


def _number_columns(values: dict[str, list[float]]) -> dict[str, Any]:
    """A row's number columns from the micro-batch's host values; a value the step did not report is null."""
    def first(name):
        return values[name][0] if name in values else None

    return {
        "loss": first("loss"), "losses": values.get("losses"), "p_gold": values.get("p_gold"),
        "correct": [bool(x) for x in values["correct"]] if "correct" in values else None,
        "grad_norm": first("grad_norm"),
        "n_tokens": int(sum(values["n_tokens"])) if "n_tokens" in values else None,
        "n_target_tokens": int(sum(values["n_target"])) if "n_target" in values else None,
    }


def _next_attempt(directory: Path) -> int:
    """One more than the latest attempt on disk (0 for a fresh run)."""
    attempts = read_parts(directory / "attempts", schema.ATTEMPTS)["attempt"].to_pylist()
    return max(attempts, default=-1) + 1


def _attempt_row(trainer: L.Trainer, run_id: str, attempt: int, parent_attempt: int | None) -> dict[str, Any]:
    resumed = trainer.ckpt_path is not None and parent_attempt is not None
    return {"run_id": run_id, "attempt": attempt, "parent_attempt": parent_attempt if resumed else None,
            "started_at": utc_now(), "resumed_from": str(storage.public(trainer.ckpt_path)) if resumed else None,
            "resumed_step": trainer.global_step, "world_size": trainer.world_size, "host": socket.gethostname()}


class TrackingError(LoratraceError):
    """A run's tracking/ history that cannot be continued: an unreadable part, or steps missing from its lineage."""
