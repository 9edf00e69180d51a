"""BatchTracker: a Lightning callback that records every micro-batch's examples in Parquet under `tracking/`.

Works in any Lightning loop whose batches carry `example_id` (list of str) and `line` (int tensor or list), and
whose `training_step` returns a dict with `loss` and, optionally, per-example `losses`, `p_gold`, `correct` and
`n_tokens` / `n_target` (loratrace's `LoRAModule` does). Missing per-example values are written as nulls.

    trainer = L.Trainer(callbacks=[BatchTracker("runs/x/tracking", run_id="x")])

Rows are buffered and flushed as new parts (temporary name, then `os.replace`) at every checkpoint save, every
`flush_every_steps` updates, at the end and on exceptions; a part is never rewritten. Writing happens on a
background thread, off the training step's path. The callback's own state (attempt, part counter) travels in the
checkpoint, so a resume starts attempt a+1 and knows which attempt it continues.

The tracker accounts for its own cost (`cost()`): wall time in its hooks on the training thread, CPU time of its
writer threads, and the end-of-run work; `train` records it in run.json and prints it.
"""

from __future__ import annotations

import datetime as dt
import functools
import socket
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightning as L
import pyarrow as pa
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from loratrace import schema
from loratrace.mappings import Mappings, lineage_ranges, read_parts
from loratrace.module import HostValues, gradient_norm


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _on_training_thread(hook):
    """Count the hook's wall time as the tracker's cost on the training thread: outermost calls only (hooks that
    call `flush` or `wait` are not counted twice), and none after training ended (that is `end_s`)."""
    @functools.wraps(hook)
    def timed(self, *args, **kwargs):
        if self._in_hook or self._train_ended is not None:
            return hook(self, *args, **kwargs)
        self._in_hook, start = True, time.perf_counter()
        try:
            return hook(self, *args, **kwargs)
        finally:
            self._in_hook = False
            self._training_thread_s += time.perf_counter() - start
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
        self.attempt = 0
        self.parent_attempt: int | None = None
        self._rows: list[dict[str, Any]] = []
        self._unread: tuple[dict[str, Any], HostValues, list[tuple[str, int]]] | None = None  # the last micro-batch
        self._part = 0
        self._micro_batch = 0
        self._pending_update: dict[str, Any] | None = None
        self._last_flush_step = 0
        self.defer_wait = False
        self._mappings: Mappings | None = None  # rank 0 only
        self._writer: ThreadPoolExecutor | None = None  # parts, in submission order
        self._mapper: ThreadPoolExecutor | None = None  # mapping refreshes, never waited on by a step
        self._futures: list[Future] = []
        self._mapping: Future | None = None
        self.rank = 0
        self._in_hook = False
        self._training_thread_s = 0.0
        self._background_cpu_s: list[float] = []  # appended by the writer threads
        self._end_s = 0.0
        self._train_started: float | None = None
        self._train_ended: float | None = None
        self._updates = 0

    @property
    def state_key(self) -> str:
        return f"BatchTracker[{self.run_id}]"

    # ------------------------------------------------------------------ state in the checkpoint

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"attempt": self.attempt, "run_id": self.run_id}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.parent_attempt = int(state_dict["attempt"])

    # ------------------------------------------------------------------ lifecycle

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.rank = trainer.global_rank
        latest = -1
        if trainer.is_global_zero:
            for row in read_parts(self.directory / "attempts", schema.ATTEMPTS).to_pylist():
                latest = max(latest, int(row["attempt"]))
        # Every rank must agree on the attempt number before any rank writes a part.
        self.attempt = int(trainer.strategy.broadcast(latest + 1, src=0))
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loratrace-tracking")
        self._mapper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loratrace-mappings")

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._train_started = time.perf_counter()
        self._last_flush_step = trainer.global_step
        if not trainer.is_global_zero:
            return
        resumed = trainer.ckpt_path is not None and self.parent_attempt is not None
        attempt_row = {
            "run_id": self.run_id, "attempt": self.attempt,
            "parent_attempt": self.parent_attempt if resumed else None,
            "started_at": _now(), "resumed_from": str(trainer.ckpt_path) if resumed else None,
            "resumed_step": trainer.global_step, "world_size": trainer.world_size, "host": socket.gethostname(),
        }
        table = pa.Table.from_pylist([attempt_row], schema=schema.ATTEMPTS)
        self._submit(schema.write_atomic, table, self.directory / "attempts" / f"a{self.attempt:03d}.parquet")
        self._mappings = Mappings(self.directory, self.run_id, lineage_ranges(self.directory, attempt_row))
        examples_path = self.directory / "examples.parquet"
        if self.examples is not None and not examples_path.exists():
            rows = [{"run_id": self.run_id, **row} for row in self.examples]
            self._submit(schema.write_atomic, pa.Table.from_pylist(rows, schema=schema.EXAMPLES), examples_path)

    @override
    @_on_training_thread
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        # Callback hooks run before the module's: a module that measures the norm itself (LoRAModule) has not done
        # so yet; its value is read at batch end. Any other module's gradients are measured here, before clipping.
        grad_norm = None
        if not hasattr(pl_module, "grad_norm"):
            grad_norm = gradient_norm(pl_module.parameters())
        self._pending_update = {"grad_norm": grad_norm, "lr": float(optimizer.param_groups[0]["lr"])}

    @override
    @_on_training_thread
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        update, self._pending_update = self._pending_update, None
        stepped = update is not None
        if stepped and update["grad_norm"] is None:
            update["grad_norm"] = pl_module.grad_norm
        step = trainer.global_step if stepped else trainer.global_step + 1
        lr = update["lr"] if stepped else float(trainer.optimizers[0].param_groups[0]["lr"])
        self._read_numbers()  # the micro-batch before this one: long computed, its copy to the host done
        self._unread = self._row(trainer, outputs, batch, batch_idx, step, update, lr)
        self._micro_batch = 0 if stepped else self._micro_batch + 1
        if stepped:
            self._updates += 1
        if stepped and trainer.global_step - self._last_flush_step >= self.flush_every_steps:
            self.flush()

    def _row(self, trainer, outputs, batch, batch_idx, step, update, lr):
        """The micro-batch's row, less its numbers: those come to the host in one transfer, read a micro-batch later
        (`HostValues`), so that the step never waits for the GPU."""
        outputs = outputs if isinstance(outputs, dict) else {"loss": outputs}
        ids = [str(i) for i in batch["example_id"]]
        pieces = [outputs["loss"].detach().float().reshape(1)]
        names = ["loss"]
        for key in ("losses", "p_gold", "correct", "n_tokens", "n_target"):
            value = outputs.get(key)
            if isinstance(value, torch.Tensor):
                pieces.append(value.detach().float().reshape(-1))
                names.append(key)
        if update is not None:
            pieces.append(update["grad_norm"].detach().float().reshape(1))
            names.append("grad_norm")
        numbers = HostValues(torch.cat([p.to(pieces[0].device) for p in pieces]))
        lines = batch["line"]
        lines = lines.tolist() if isinstance(lines, torch.Tensor) else [int(x) for x in lines]
        stage = 1 if self.stage1_steps is None or step <= self.stage1_steps else 2
        row = {
            "run_id": self.run_id, "attempt": self.attempt, "step": step, "micro_batch": self._micro_batch,
            "rank": trainer.global_rank, "epoch": int(batch.get("epoch", trainer.current_epoch)),
            "batch_idx": int(batch.get("batch_in_epoch", batch_idx)), "stage": stage,
            "example_ids": ids, "lines": lines, "lr": lr, "wall_time": _now(),
        }
        return row, numbers, [(name, piece.numel()) for name, piece in zip(names, pieces)]

    def _read_numbers(self) -> None:
        """Complete the last micro-batch's row with its numbers and buffer it."""
        if self._unread is None:
            return
        (row, numbers, layout), self._unread = self._unread, None
        flat, values, cursor = numbers.values(), {}, 0
        for name, size in layout:
            values[name] = flat[cursor: cursor + size]
            cursor += size
        row.update({
            "losses": values.get("losses"), "p_gold": values.get("p_gold"),
            "correct": [bool(x) for x in values["correct"]] if "correct" in values else None,
            "loss": values["loss"][0], "grad_norm": values["grad_norm"][0] if "grad_norm" in values else None,
            "n_tokens": int(sum(values["n_tokens"])) if "n_tokens" in values else None,
            "n_target_tokens": int(sum(values["n_target"])) if "n_target" in values else len(row["example_ids"]),
        })
        self._rows.append(row)

    @override
    @_on_training_thread
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # Durable before the checkpoint exists: a crash right after the .ckpt appears must not lose its rows.
        # loratrace's StepCheckpoint sets `defer_wait` and waits itself just before its file appears, so the part
        # is written while torch serializes the checkpoint instead of before.
        self.flush()
        if not self.defer_wait:
            self.wait()

    @_on_training_thread
    def record_checkpoint(self, trainer: L.Trainer, step: int, path: str, size: int) -> None:
        """Called by whoever wrote a checkpoint file (rank 0): one `checkpoints` row, then the mappings."""
        if not trainer.is_global_zero:
            return
        row = {"run_id": self.run_id, "attempt": self.attempt, "step": step, "path": path, "bytes": size,
               "created_at": _now()}
        self._submit(_write_rows, [row], self.directory / "checkpoints" / f"a{self.attempt:03d}-s{step:09d}.parquet",
                     schema.CHECKPOINTS)
        # The mappings are refreshed on their own thread, at a save when the last refresh is done and the time since
        # it ended is long enough that refreshing stays within `Mappings.refresh_share` of the wall time (the seed
        # saves every update; a refresh each time would compete with the step for the CPU). The end always refreshes.
        idle = self._mapping is None or self._mapping.done()
        if self._mapper is not None and self._mappings is not None and idle and self._mappings.due():
            # The refresh must read the parts queued so far; it waits for them on its own thread, not the step's.
            parts_on_disk = self._writer.submit(lambda: None)
            self._mapping = self._mapper.submit(self._cpu_timed, _after, parts_on_disk, self._mappings.refresh)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._train_ended = time.perf_counter()
        try:
            self._finish(trainer)
        finally:
            self._end_s = time.perf_counter() - self._train_ended

    def _finish(self, trainer: L.Trainer) -> None:
        self.flush()
        self.close()
        trainer.strategy.barrier("loratrace-tracking-end")  # every rank's last part is on disk
        if self._mappings is not None:
            self._mappings.refresh()
            if self.directory.name == "tracking":  # a run folder's: the query layer looks there for the index
                try:
                    from loratrace.store import write_samples_index  # DuckDB: only on the way out
                except ImportError as error:  # tracking itself needs only pyarrow; `trace` falls back to the views
                    warnings.warn(f"loratrace: samples index not written ({error})", stacklevel=2)
                else:
                    write_samples_index(self.directory.parent)

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.flush()
        self.close()
        if self._mappings is not None:  # what was trained up to the failure, for a pandas user
            try:
                self._mappings.refresh()
            except Exception as error:  # noqa: BLE001 - the training error is the one to report
                warnings.warn(f"loratrace: could not refresh the tracking mappings: {error}", stacklevel=2)

    # ------------------------------------------------------------------ writing

    @_on_training_thread
    def flush(self) -> None:
        """Hand the buffered rows to the writer thread as one new part."""
        self._read_numbers()
        if not self._rows:
            return
        rows, self._rows = self._rows, []
        self._last_flush_step = max(self._last_flush_step, rows[-1]["step"])
        name = f"a{self.attempt:03d}-r{self.rank:02d}-{self._part:06d}.parquet"
        self._part += 1
        self._submit(_write_rows, rows, self.directory / "batches" / name)

    def _submit(self, fn, *args) -> None:
        if self._writer is None:  # used outside fit (tests, manual calls): write inline
            fn(*args)
            return
        self._futures = [f for f in self._futures if not f.done() or f.exception() is not None]
        self._futures.append(self._writer.submit(self._cpu_timed, fn, *args))  # one thread: parts land in order

    def _cpu_timed(self, fn, *args) -> None:
        start = time.thread_time()
        try:
            fn(*args)
        finally:
            self._background_cpu_s.append(time.thread_time() - start)

    @_on_training_thread
    def wait(self) -> None:
        """Block until every write handed to the writer thread is on disk; re-raise the first write error."""
        futures, self._futures = self._futures, []
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            raise errors[0]

    def close(self) -> None:
        """Wait for every pending write; re-raise the first write error."""
        if self._writer is None:
            return
        writer, self._writer = self._writer, None
        writer.shutdown(wait=True)
        if self._mapper is not None:
            self._mapper.shutdown(wait=True)
            self._mapper = None
        if self._mapping is not None and self._mapping.exception() is not None:
            warnings.warn(f"loratrace: refreshing the tracking mappings failed: {self._mapping.exception()}",
                          stacklevel=2)
        self.wait()

    def cost(self) -> dict[str, float | int]:
        """What tracking cost this launch, in seconds.

        `training_thread_s`: wall time in the tracker's hooks while training; the step waits for it.
        `background_cpu_s`: CPU time of its writer threads; off the step's path, but it competes for cores.
        `end_s`: the end of training (last part, mappings, samples index), on the training thread.
        The `*_share` figures divide by `train_wall_s`, training's wall time from its first step to its end."""
        wall = (self._train_ended or time.perf_counter()) - (self._train_started or time.perf_counter())
        background = sum(self._background_cpu_s)
        return {"updates": self._updates, "train_wall_s": wall, "training_thread_s": self._training_thread_s,
                "background_cpu_s": background, "end_s": self._end_s,
                "training_thread_share": self._training_thread_s / wall if wall > 0 else 0.0,
                "background_share": background / wall if wall > 0 else 0.0}


def _after(done: Future, fn, *args) -> None:
    done.result()
    fn(*args)


def _write_rows(rows: list[dict], path: Path, table_schema: pa.Schema = schema.BATCHES) -> None:
    """Runs on the writer thread: building the Arrow table is part of the work kept off the step."""
    schema.write_atomic(pa.Table.from_pylist(rows, schema=table_schema), path)

