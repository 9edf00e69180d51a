"""What a training step hands to the tracker, and how its numbers reach the host without stalling the step.

`StepOutputs` is the dict a `training_step` returns (loratrace's `LoRAModule` fills every key; any LightningModule
may return just a loss). `HostValues` brings named tensors to the host behind the step; `gradient_norm` and
`stage_of` are the rules the module and the tracker share. Imports torch only: the tracker needs nothing of the
LoRA module itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from typing_extensions import Required, TypedDict


class StepOutputs(TypedDict, total=False):
    """What the tracker reads from a `training_step`'s return value; a key that is absent is written as null."""

    loss: Required[torch.Tensor]
    """The loss back-propagated for the micro-batch (a scalar; callbacks read it back with `micro_batch_loss`)."""
    losses: torch.Tensor
    """(batch,) each example's mean loss over its answer tokens."""
    p_gold: torch.Tensor
    """(batch,) probability of the gold choice label among the choice labels."""
    correct: torch.Tensor
    """(batch,) bool: the gold label had the highest probability."""
    n_tokens: torch.Tensor
    """Non-padding tokens of the micro-batch (summed if given per example)."""
    n_target: torch.Tensor
    """(batch,) answer tokens each example's loss averages over."""


def micro_batch_loss(outputs: Mapping, trainer) -> torch.Tensor:
    """The micro-batch's loss as `training_step` returned it, from the `outputs` Lightning hands `on_train_batch_end`.
    Under automatic optimization Lightning divides the loss by `accumulate_grad_batches` before its backward (so the
    accumulated gradient is the mean over the micro-batches) and hands callbacks that divided value."""
    loss = outputs["loss"].detach()
    scale = trainer.accumulate_grad_batches
    return loss * scale if scale > 1 and trainer.lightning_module.automatic_optimization else loss


def stage_of(step: int, stage1_steps: int | None) -> int:
    """The recipe's stage of update `step`: 1 up to `stage1_steps`, then 2 (always 1 when there are no stages)."""
    return 1 if stage1_steps is None or step <= stage1_steps else 2


def gradient_norm(parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """Global L2 norm of the gradients of `parameters` (those that have one)."""
    grads = [p.grad.detach().float() for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


class HostValues:
    """Named tensors computed on an accelerator, brought to the host without making the CPU wait for the GPU.

    The tensors travel in one copy queued behind the work that computes them and are read (`values()`) an update
    later, when that work is done: a `.cpu()` in every update would drain the GPU's queue each time, leaving it idle
    while Python prepares the next update. On the CPU no copy is made. Values come back as float lists by name.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        pieces = [tensor.detach().float().reshape(-1) for tensor in tensors.values()]
        self._layout = [(name, piece.numel()) for name, piece in zip(tensors, pieces)]
        device = pieces[0].device if pieces else torch.device("cpu")
        flat = torch.cat([piece.to(device) for piece in pieces]) if pieces else torch.zeros(0)
        self._ready = None
        if flat.is_cuda:
            self._host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            self._host.copy_(flat, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = flat

    def values(self) -> dict[str, list[float]]:
        if self._ready is not None:
            self._ready.synchronize()
        flat, out, cursor = self._host.tolist(), {}, 0
        for name, size in self._layout:
            out[name] = flat[cursor: cursor + size]
            cursor += size
        return out
