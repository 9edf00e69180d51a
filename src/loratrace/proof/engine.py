"""Re-executing a run's training from one of its full checkpoints, fed given micro-batches.

The building blocks are the recipe's own: the base model (loaded once per `Engine`, its LoRA tensors swapped per
re-execution), `LoRAModule`'s training step, and a Lightning `Trainer.fit(ckpt_path=...)` that restores the LoRA
tensors, optimizer, scheduler, loop, loader position and RNG exactly as a resume does. Only the loader differs: a
`FedLoader` is the run's `EpochLoader` whose batches at the recorded (epoch, position) are the given ones. So a
re-execution fed the recorded batches is a resume of the run, which reproduces its weights bit for bit on the CPU.

    engine = Engine(run_dir)                                      # config, data, base model: once
    fed = engine.fit(checkpoint, end_step, {(0, 37): ["id1", ...], ...}, callbacks=[Capture()])
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint
from typing_extensions import override

from loratrace.config import load_config
from loratrace.data.datasets import load_split
from loratrace.data.encoding import encode, padding_token_id
from loratrace.data.loader import EpochLoader, _Collate
from loratrace.proof.record import ProofError, check_training_data
from loratrace.recipe import quiet_libraries
from loratrace.runs.find import read_run_folder
from loratrace.track.step_outputs import micro_batch_loss
from loratrace.training.checkpoints import UpdateBoundary
from loratrace.training.model import load_run_model
from loratrace.training.module import LoRAModule

GPU_TOLERANCE = 1e-4
"""Largest absolute difference accepted on a GPU (losses, grad-norms, lr, per-example losses, LoRA tensors): cuBLAS
and cuDNN sum in orders that differ between launches even with deterministic algorithms; on the CPU: 0."""


class FedLoader(EpochLoader):
    """The run's `EpochLoader` with the batches at given (epoch, position) replaced by given example indices: its
    length, its saved position and Lightning's restore of it are the run's. A batch emptied by a replay's drops
    becomes an empty micro-batch (`EmptyCollate`)."""

    def __init__(self, *args, fed: dict[tuple[int, int], list[int]], **kwargs):
        super().__init__(*args, **kwargs)
        self.fed = fed
        self._fed_batches: tuple[int, list[list[int]]] | None = None

    @override
    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        if self._fed_batches is None or self._fed_batches[0] != epoch:
            batches = [list(b) for b in super()._epoch_batches(epoch)]
            for (e, position), members in self.fed.items():
                if e == epoch:
                    batches += [[] for _ in range(position + 1 - len(batches))]
                    batches[position] = list(members)
            self._fed_batches = (epoch, batches)
        return self._fed_batches[1]

    @override
    def _generate(self, batches, epoch, offset):
        # an empty list is no batch to torch's DataLoader: a one-example stand-in, emptied again by EmptyCollate
        marked = [members or [-1] for members in batches]
        self._collate = EmptyCollate(self.pad_id, self.examples[0])
        return _fed_generate(self, marked, epoch, offset)


class EmptyCollate(_Collate):
    """`collate`, and for the stand-in of an emptied micro-batch (index -1) the same tensors with no rows."""

    def __init__(self, pad_id: int, any_example):
        super().__init__(pad_id)
        self.any_example = any_example

    def __call__(self, batch):
        if any(item is None for item in batch):
            full = super().__call__([self.any_example])
            return {k: (v[:0] if isinstance(v, torch.Tensor) else []) for k, v in full.items()}
        return super().__call__(batch)


class _WithHole(list):
    """The examples, where index -1 is None (an emptied micro-batch's stand-in)."""

    def __getitem__(self, index):
        return None if index == -1 else super().__getitem__(index)


def _fed_generate(loader: FedLoader, batches, epoch: int, offset: int):
    from torch.utils.data import DataLoader

    data = DataLoader(_WithHole(loader.examples), batch_sampler=batches, num_workers=loader.num_workers,
                      collate_fn=loader._collate, generator=torch.Generator().manual_seed(loader.seed))
    for position, batch in enumerate(data, start=offset):
        loader.offset = position + 1
        batch["epoch"] = epoch
        batch["batch_in_epoch"] = position
        yield batch


class FedModule(LoRAModule):
    """`LoRAModule`, whose training step on a micro-batch a replay emptied returns None: Lightning then back-propagates
    nothing for it, and an update of such micro-batches only leaves the gradients unset, so AdamW leaves the weights
    as they were while the schedule moves on. Any other micro-batch is LoRAModule's own step."""

    @override
    def training_step(self, batch: dict[str, Any], batch_idx: int):
        if batch["input_ids"].shape[0] == 0:
            for name in ("loss_x_target", "target", "correct"):  # the update's logged sums: zero, not absent
                self._update_sums.setdefault(name, torch.zeros((), device=self.device))
            return None
        return super().training_step(batch, batch_idx)


class Capture(UpdateBoundary):
    """What each micro-batch of a re-execution gave, as the tracker records it: step, loss, per-example losses, and
    for the micro-batch that ends an update its grad-norm and lr. `weights_at`: the LoRA tensors after those steps."""

    def __init__(self, weights_at: set[int] = frozenset()):
        self.rows: list[dict[str, Any]] = []
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.weights_at = set(weights_at)
        self._lr: float | None = None
        self._micro_batch = 0

    @override
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._lr = float(optimizer.param_groups[0]["lr"])

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        done = self.update_finished(trainer)
        step = trainer.global_step if done else trainer.global_step + 1
        trained = isinstance(outputs, dict) and outputs.get("loss") is not None  # {}: an emptied micro-batch
        self.rows.append({
            "step": step, "micro_batch": self._micro_batch, "example_ids": list(batch["example_id"]),
            "loss": float(micro_batch_loss(outputs, trainer).float()) if trained else None,
            "losses": outputs["losses"].float().tolist() if trained else [],
            "grad_norm": float(pl_module.grad_norm) if done and pl_module.grad_norm is not None else None,
            "lr": self._lr if done else None,
        })
        self._micro_batch = 0 if done else self._micro_batch + 1
        if done and step in self.weights_at:
            keep = pl_module.trainable_keys()
            self.weights[step] = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()
                                  if k in keep}


class Engine:
    """One run's config, training data and base model, loaded once for any number of re-executions."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        if not (self.run_dir / "config.yaml").is_file():
            raise ProofError(f"{self.run_dir} is not a run folder (no config.yaml)")
        self.info, _ = read_run_folder(self.run_dir)  # a damaged run.json or tracking/ is one line, before any work
        self.cfg = load_config(self.run_dir / "config.yaml", notice=lambda line: None)
        data = self.cfg.data
        self.examples = load_split(data.dataset, data.source, data.train_split, data.limit,
                                   notice=lambda line: None)  # a bad data set is its own DataError
        check_training_data(self.run_dir, self.examples)
        self.index = {e.example_id: i for i, e in enumerate(self.examples)}
        self.gpu = _uses_gpu(self.cfg.training.accelerator)
        if self.gpu:  # before cuBLAS starts: its deterministic workspace
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        with _quiet():  # a base model that cannot load is its own error (ModelError), raised where it is caused
            self.model, self.tokenizer = load_run_model(self.cfg, self.run_dir)

        self.encoded = encode(self.examples, self.tokenizer, data.max_length)
        self.tolerance = GPU_TOLERANCE if self.gpu else 0.0

    def indices(self, fed: dict[tuple[int, int], list[str]]) -> dict[tuple[int, int], list[int]]:
        """Example ids -> positions in the training data; an id the data lacks is a ValueError naming it."""
        out = {}
        for place, ids in fed.items():
            missing = [i for i in ids if i not in self.index]
            if missing:
                raise ValueError(missing[0])
            out[place] = [self.index[i] for i in ids]
        return out

    def fit(self, checkpoint: Path, end_step: int, fed: dict[tuple[int, int], list[int]], callbacks: list,
            root_dir: Path, logger=False) -> L.Trainer:
        """Continue the run from `checkpoint` (a full one) up to `end_step`, fed `fed`'s batches where given; Lightning
        writes whatever it writes (nothing, without a logger or checkpoint callback) under `root_dir`."""
        t = self.cfg.training
        loader = FedLoader(self.encoded, t.batch_size, t.seed, padding_token_id(self.tokenizer), fed=fed)
        module = FedModule(self.model, t)
        module.train()
        deterministic = torch.are_deterministic_algorithms_enabled()
        if self.gpu:
            torch.use_deterministic_algorithms(True, warn_only=True)
        with _quiet():  # its notes on the hardware, and on the resume's absent callbacks
            trainer = L.Trainer(
                max_steps=end_step, max_epochs=-1, accumulate_grad_batches=t.accumulate_grad_batches,
                gradient_clip_val=t.max_grad_norm or None, gradient_clip_algorithm="norm", precision=t.precision,
                accelerator=t.accelerator, devices=1, num_nodes=1, logger=logger, callbacks=callbacks,
                enable_checkpointing=any(isinstance(c, Checkpoint) for c in callbacks), enable_progress_bar=False,
                enable_model_summary=False, default_root_dir=str(root_dir), log_every_n_steps=t.log_every_n_steps,
                use_distributed_sampler=False, num_sanity_val_steps=0, limit_val_batches=0)
            try:
                trainer.fit(module, train_dataloaders=loader, ckpt_path=str(checkpoint))
            finally:
                torch.use_deterministic_algorithms(deterministic)
        return trainer


def _uses_gpu(accelerator: str) -> bool:
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


@contextlib.contextmanager
def _quiet():
    """Lightning's notes on a resume (callbacks of the checkpoint not present, few loader workers) and the libraries'
    deprecation notices say nothing a user of verify or replay can act on."""

    with quiet_libraries(), warnings.catch_warnings():
        for message in (".*callback states.*", ".*Be aware that when using `ckpt_path`.*", ".*ckpt_path.*",
                        ".*returned `None`.*"):
            warnings.filterwarnings("ignore", message)
        yield
