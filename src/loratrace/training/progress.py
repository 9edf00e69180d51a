"""Training progress on stderr (stdout carries only the summary, so `loratrace train > summary.txt` works).

`logging.progress` (`train --progress`): `bar` is Lightning's progress bar; `lines` prints one plain line every
`logging.progress_every_n_steps` updates, for a log file, SLURM's output or CI, where the bar's carriage-return frames
pile up as one unreadable line; `none` prints nothing; `auto` is the bar on a terminal and lines otherwise.

    step 10/125 (8%)  loss 1.2345  lr 0.003  0.52 s/step  elapsed 0:00:05  left 0:01:00
"""

from __future__ import annotations

import datetime as dt
import sys
import time
from collections.abc import Mapping

import lightning as L
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from typing_extensions import override

from loratrace.track.step_outputs import micro_batch_loss


def progress_mode(setting: str, enabled: bool = True) -> str:
    """`bar`, `lines` or `none` for `logging.progress` (`auto`: the bar when stderr is a terminal); none when the
    caller turned progress off (`train(progress=False)`)."""
    if not enabled:
        return "none"
    if setting == "auto":
        return "bar" if sys.stderr.isatty() else "lines"
    return setting


def progress_callbacks(mode: str, every_n_steps: int) -> list[Callback]:
    return {"bar": [ProgressBar()], "lines": [ProgressLines(every_n_steps)]}.get(mode, [])


class ProgressBar(TQDMProgressBar):
    """Lightning's bar, on stderr."""

    def __init__(self):
        super().__init__(refresh_rate=1)

    @override
    def init_train_tqdm(self) -> Tqdm:
        return Tqdm(desc=self.train_description, position=2 * self.process_position, disable=self.is_disabled,
                    leave=True, dynamic_ncols=True, file=sys.stderr, smoothing=0, bar_format=self.BAR_FORMAT)

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._train_progress_bar is not None:  # end its line: the message that follows starts on its own
            self.train_progress_bar.close()


class ProgressLines(Callback):
    """One line on stderr every `every_n_steps` updates and at the last (rank 0 only): step, loss, lr, speed, time."""

    def __init__(self, every_n_steps: int = 10):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be at least 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._started, self._first_step, self._shown = 0.0, 0, -1

    @property
    def state_key(self) -> str:
        return f"ProgressLines[every={self.every_n_steps}]"

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a resume counts from its step; a micro-batch that ends no update keeps the step: nothing new to show
        self._started, self._first_step = time.monotonic(), trainer.global_step
        self._shown = trainer.global_step

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step, total = trainer.global_step, trainer.max_steps
        if not trainer.is_global_zero or step == self._shown or (step % self.every_n_steps and step != total):
            return
        self._shown = step
        loss = float(micro_batch_loss(outputs, trainer)) if isinstance(outputs, Mapping) and "loss" in outputs else None
        print(self.line(trainer, step, total, loss), file=sys.stderr, flush=True)

    def line(self, trainer: L.Trainer, step: int, total: int, loss: float | None) -> str:
        """`loss`: the step's last micro-batch's, as the bar shows it (one read from the device per line)."""
        elapsed = time.monotonic() - self._started
        per_step = elapsed / max(step - self._first_step, 1)
        parts = [f"step {step}/{total} ({step / total:.0%})" if total > 0 else f"step {step}"]
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.3g}")
        parts += [f"{per_step:.2f} s/step", f"elapsed {_clock(elapsed)}"]
        if total > step:
            parts.append(f"left {_clock(per_step * (total - step))}")
        return "  ".join(parts)


def _clock(seconds: float) -> str:
    return str(dt.timedelta(seconds=round(seconds)))
