"""The two training arms every throughput figure compares, timed the same way.

    fit_timing(runs_dir, overrides)          loratrace's recipe (tracked or not), via `loratrace.train`
    hf_trainer_timing(runs_dir, overrides)   a plain `transformers.Trainer` + PEFT script on the same model and data

Both return the mean wall time of an update after `SKIP` warm-up updates (checkpoint steps count in full) and the
tokens those updates trained on. On CUDA the clock synchronizes at the first counted update and the last, never in
between, so neither arm loses its CPU/GPU overlap to the measurement.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch

import loratrace
from loratrace.config import Config, load_config

SKIP = 5
QUIET = ["logging.swanlab=false", "logging.tensorboard=false", "export.merged_model=false", "export.adapter=false"]


class Clock:
    """Marks the end of updates `SKIP` .. `total`; `result()` is the mean update time in between."""

    def __init__(self, total: int, cuda: bool):
        self.total, self.cuda = total, cuda
        self.start: float | None = None
        self.end: float | None = None
        self.tokens = 0  # non-padding tokens of the counted updates (an int, or a device tensor summed lazily)
        self.padded = 0  # batch x padded length, summed
        self.attention = 0  # batch x padded length squared, summed (attention's FLOPs grow with it)

    def counting(self, step: int) -> bool:
        """Whether the update that ends at `step` is counted."""
        return SKIP < step <= self.total

    def add_batch(self, attention_mask: torch.Tensor) -> None:
        rows, length = attention_mask.shape
        self.tokens = self.tokens + attention_mask.sum()
        self.padded += rows * length
        self.attention += rows * length * length

    def tick(self, step: int) -> None:
        if step in (SKIP, self.total):
            if self.cuda:
                torch.cuda.synchronize()
            if step == SKIP:
                self.start = time.perf_counter()
            else:
                self.end = time.perf_counter()

    def result(self) -> dict:
        if self.start is None or self.end is None:
            raise RuntimeError(f"timed {self.total} updates: need more than {SKIP}")
        steps = self.total - SKIP
        return {"step_s": (self.end - self.start) / steps, "steps": steps, "seconds": self.end - self.start,
                "tokens": int(self.tokens), "padded": self.padded, "attention": self.attention}


class StepTimer(L.Callback):
    """A `Clock` on loratrace's fit loop (the batch is already on the device at `on_train_batch_start`)."""

    def __init__(self, total: int, cuda: bool):
        self.clock = Clock(total, cuda)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.clock.counting(trainer.global_step + 1):
            self.clock.add_batch(batch["attention_mask"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.clock.tick(trainer.global_step)


def _cuda(cfg: Config) -> bool:
    return cfg.training.accelerator != "cpu" and torch.cuda.is_available()


def fit_timing(runs_dir: Path, overrides: list[str], callbacks: list | None = None) -> dict:
    """Time loratrace's recipe; `result["run"]` is the run folder."""
    cfg = load_config(None, [*QUIET, f"runs_dir={runs_dir}", *overrides])
    timer = StepTimer(cfg.training.max_steps, _cuda(cfg))
    run = loratrace.train(cfg, progress=False, callbacks=[timer, *(callbacks or [])])
    return {**timer.clock.result(), "run": run}


def accounted_overhead(tracked_runs: list[Path], untracked_step_s: float) -> dict:
    """Tracking's cost by the tracker's own accounting (run.json's `tracking_cost`), per update, against the untracked
    update time: a bound that the machine's noise does not blur, unlike the ratio of two wall times.

    `low` counts the training thread's time in the tracker's hooks (what the step waits for); `high` adds all of the
    writer threads' CPU time, as if every core were busy with the step and the writer took its time from it."""
    costs = [json.loads((run / "run.json").read_text())["attempts"][-1]["tracking_cost"] for run in tracked_runs]
    thread = statistics.median(c["training_thread_s"] / c["updates"] for c in costs)
    writer = statistics.median(c["background_cpu_s"] / c["updates"] for c in costs)
    return {"thread_ms": thread * 1e3, "writer_ms": writer * 1e3, "untracked_ms": untracked_step_s * 1e3,
            "low": 1 + thread / untracked_step_s, "high": 1 + (thread + writer) / untracked_step_s}


def accounted_row(label: str, a: dict) -> tuple[str, str, str, str]:
    return (f"tracking overhead by the tracker's accounting, {label}: (hooks + writer CPU) per update / untracked "
            "update", f"({a['thread_ms']:.2f} + {a['writer_ms']:.2f} ms) / {a['untracked_ms']:.1f} ms",
            f"{a['low']:.3f}-{a['high']:.3f}", "<= 1.02")


def drop_printer(trainer) -> None:
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # its end-of-training dict would land inside the results table


def hf_trainer(cfg: Config, output_dir: Path, callback, on_batch: Callable[[dict], None] | None = None):
    """A plain `transformers.Trainer` + PEFT script on the config's model (dtype, device), data, batch size, steps
    and learning rate, with bf16 autocast where loratrace's precision is bf16. `callback` is a `TrainerCallback`;
    `on_batch` sees each collated batch, in the order the updates use them."""
    from transformers import Trainer, TrainingArguments

    from loratrace.data.datasets import load_split
    from loratrace.data.encoding import collate, encode, padding_token_id
    from loratrace.training.model import add_lora, load_base

    t = cfg.training
    base, tokenizer = load_base(cfg.model)
    encoded = encode(load_split(cfg.data.dataset, cfg.data.source, cfg.data.train_split, cfg.data.limit), tokenizer,
                     cfg.data.max_length)
    pad_id = padding_token_id(tokenizer)

    def collator(batch):
        full = collate(batch, pad_id)
        if on_batch is not None:
            on_batch(full)
        return {k: full[k] for k in ("input_ids", "attention_mask", "labels")}

    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=t.max_steps, per_device_train_batch_size=t.batch_size,
        learning_rate=t.learning_rate_stage1, lr_scheduler_type="constant", max_grad_norm=t.max_grad_norm,
        save_strategy="no", logging_strategy="no", report_to=[], use_cpu=not _cuda(cfg),
        bf16=t.precision.startswith("bf16"), seed=t.seed, dataloader_num_workers=0, remove_unused_columns=False,
        disable_tqdm=True)
    trainer = Trainer(model=add_lora(base, cfg.lora, t.seed), args=args, train_dataset=encoded,
                      data_collator=collator, callbacks=[callback])
    drop_printer(trainer)
    return trainer


def hf_trainer_timing(runs_dir: Path, overrides: list[str]) -> dict:
    """Time `hf_trainer` on the same model, data and steps as loratrace's recipe, saving a full Trainer checkpoint
    (adapter, optimizer, scheduler, RNG) after every update of the second stage, as loratrace's recipe does."""
    from transformers import TrainerCallback

    cfg = load_config(None, [f"runs_dir={runs_dir}", *overrides])
    t = cfg.training
    clock = Clock(t.max_steps, _cuda(cfg))
    masks: list[torch.Tensor] = []

    class Tail(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.tick(state.global_step)
            control.should_save = state.global_step > t.stage1_steps

    hf_trainer(cfg, Path(runs_dir) / "hf-baseline", Tail(), lambda batch: masks.append(batch["attention_mask"])).train()
    for mask in masks[SKIP: t.max_steps]:
        clock.add_batch(mask)
    return clock.result()
