"""Per-example gradients of training's per-example loss with respect to the LoRA parameters only, batched.

    computer = ExampleGradients(peft_model, pad_id, batch_size=8)            # the base model is loaded once
    load_lora_weights(peft_model, checkpoint)                                 # a checkpoint's LoRA tensors swapped in
    for rows, grads in computer.gradients(encoded):                           # grads: (len(rows), n) float32
        ...

The loss is the one training records per example (`module.answer_statistics`): the mean token cross-entropy over
the example's answer tokens. It is computed without dropout (the model in eval mode), so a gradient is a function of
the weights alone. `torch.func.vmap(grad(...))` gives a batch's per-example gradients in one pass; attention runs
as the "eager" implementation, whose matmuls vmap batches (SDPA has no batching rule: it would loop).

`Projection(dim, seed)` multiplies each gradient by a fixed Gaussian matrix (entries N(0, 1/dim)), as TRAK does, so
dot products are kept in expectation while a stored gradient takes `dim` floats instead of one per LoRA parameter.
The matrix is never held whole: it is cut into blocks of `BLOCK` rows, block b drawn from a generator seeded with
`seed * 1_000_003 + b`; blocks are cached only while the whole matrix fits `CACHE_BYTES`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from loratrace.data.encoding import Encoded, collate
from loratrace.training.module import decoder_and_head


class _AnswerLoss(torch.nn.Module):
    """One example's answer-token loss: the mean cross-entropy at fixed-width target slots (vmap needs static
    shapes, so `answer_statistics`' boolean indexing becomes a gather plus a mask over the unused slots)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.plain_head = decoder_and_head(model)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor,
                used: torch.Tensor) -> torch.Tensor:
        # No attention mask: padding is on the right and attention is causal, so the positions read here never see
        # it (and building a padding mask inside vmap would branch on the data).
        if self.plain_head is None:
            logits = self.model(input_ids=input_ids[None], use_cache=False).logits[0, positions]
        else:  # the LM head only at the target slots, as training does
            decoder, head = self.plain_head
            hidden = decoder(input_ids=input_ids[None], use_cache=False).last_hidden_state[0]
            logits = head(hidden[positions])
        token_loss = F.cross_entropy(logits.float(), targets, reduction="none")
        return (token_loss * used).sum() / used.sum().clamp(min=1)


def target_slots(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(positions, targets, used), each (batch, slots): the positions whose logits predict an answer token, those
    tokens, and which slots are real (an example with fewer answer tokens leaves the rest unused)."""
    labels = batch["labels"][:, 1:]  # logits at t predict the token at t + 1
    mask = labels != -100
    slots = max(int(mask.sum(dim=1).max()), 1)
    counts = mask.sum(dim=1, keepdim=True)
    first = mask.float().argmax(dim=1, keepdim=True)
    offsets = torch.arange(slots)[None]
    used = offsets < counts
    positions = torch.where(used, first + offsets, 0)
    targets = torch.where(used, labels.gather(1, positions), 0)
    return positions, targets, used.float()


class Projection:
    BLOCK = 16384
    CACHE_BYTES = 256 * 2**20

    def __init__(self, dim: int, seed: int, size: int):
        if dim < 1:
            raise ValueError(f"projection dimension must be at least 1, got {dim}")
        self.dim, self.seed, self.size = dim, seed, size
        self._cache: dict[int, torch.Tensor] | None = {} if size * dim * 4 <= self.CACHE_BYTES else None

    def _block(self, index: int, rows: int) -> torch.Tensor:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        block = torch.randn(rows, self.dim, generator=generator) / math.sqrt(self.dim)
        if self._cache is not None:
            self._cache[index] = block
        return block

    def __call__(self, flat: torch.Tensor) -> torch.Tensor:
        """(n, size) -> (n, dim)."""
        out = torch.zeros(flat.shape[0], self.dim)
        for index, start in enumerate(range(0, self.size, self.BLOCK)):
            rows = min(self.BLOCK, self.size - start)
            out += flat[:, start: start + rows].float() @ self._block(index, rows)
        return out


class ExampleGradients:
    """Per-example LoRA gradients of a PEFT model whose weights are whatever it holds when `gradients` runs."""

    def __init__(self, model: torch.nn.Module, pad_id: int, batch_size: int = 8,
                 projection: Projection | None = None):
        self.model, self.pad_id, self.batch_size, self.projection = model, pad_id, batch_size, projection
        self.model.eval()
        _eager_attention(model)
        self.loss = _AnswerLoss(model)
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        if not self.names:
            raise ValueError("the model has no trainable (LoRA) parameters")
        self.size = sum(p.numel() for p in model.parameters() if p.requires_grad)
        per_example = grad(lambda params, *example: functional_call(self.loss, params, example))
        self._batched = vmap(per_example, in_dims=(None, 0, 0, 0, 0))

    @property
    def width(self) -> int:
        """Length of one example's gradient vector as `gradients` returns it."""
        return self.projection.dim if self.projection is not None else self.size

    def gradients(self, encoded: list[Encoded]) -> Iterator[tuple[range, torch.Tensor]]:
        """(indices into `encoded`, their gradients as rows of a float32 matrix), a batch at a time."""
        own = dict(self.model.named_parameters())
        params = {f"model.{name}": own[name].detach() for name in self.names}
        for start in range(0, len(encoded), self.batch_size):
            chunk = encoded[start: start + self.batch_size]
            batch = collate(chunk, self.pad_id)
            device = params[f"model.{self.names[0]}"].device
            inputs = [t.to(device) for t in (batch["input_ids"], *target_slots(batch))]
            per_param = self._batched(params, *inputs)
            flat = torch.cat([per_param[f"model.{name}"].reshape(len(chunk), -1).float().cpu()
                              for name in self.names], dim=1)
            yield range(start, start + len(chunk)), (self.projection(flat) if self.projection is not None else flat)

    def matrix(self, encoded: list[Encoded]) -> torch.Tensor:
        """Every example's gradient, stacked: (len(encoded), width)."""
        out = torch.empty(len(encoded), self.width)
        for rows, grads in self.gradients(encoded):
            out[rows.start: rows.stop] = grads
        return out


def _eager_attention(model: torch.nn.Module) -> None:
    """Switch the base model to the plain-matmul attention, which vmap batches; outputs are the same."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "set_attn_implementation"):
        base.set_attn_implementation("eager")
    else:
        base.config._attn_implementation = "eager"
