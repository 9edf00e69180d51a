"""The stateful epoch loader: seeded, resumable batches that carry each example's id and line.

    loader = EpochLoader(encode(rows, tokenizer, 256), batch_size=32, seed=42, pad_id=0)  # Lightning saves its place
    datamodule = CommonsenseData(rows, tokenizer, max_length=256, batch_size=32, seed=42)  # what the recipe fits on
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning as L

from loratrace.data.datasets import DataError, Example
from loratrace.data.encoding import Encoded, collate, encode, padding_token_id


class EpochLoader:
    """Seeded, resumable batches: epoch `e` is a permutation drawn from (seed, e), cut into global batches of
    `batch_size * world_size`; rank `r` takes its share of each. `state_dict()` is (epoch, batches yielded), and
    Lightning saves/restores it in its checkpoint, so a resumed run continues mid-epoch with exactly the batches an
    uninterrupted run would have used; no batch is replayed or skipped.

    The epoch rolls over in `__iter__`, not after the generator's last `yield`: Lightning stops pulling a sized loader
    after `len(loader)` batches, so code there would never run.

    A run continued from a legacy checkpoint (`legacy/importer.py`) finishes the legacy epoch first: `legacy` (in the
    state) names that epoch, the batch it resumes at and the batches (example positions) that finish it; they stand in
    for the seeded permutation of that epoch only, and are saved with the place, so a later resume stays exact.
    """

    def __init__(self, examples: list[Encoded], batch_size: int, seed: int, pad_id: int,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0):
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self.pad_id = pad_id
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.epoch = 0
        self.offset = 0  # batches of `epoch` already handed out
        self._started = False
        self._batches: tuple[int, list[list[int]]] | None = None  # (epoch, its batches): Lightning asks len() often
        self.legacy: dict | None = None  # {"epoch", "start", "batches"}: the rest of a legacy epoch
        self._regular_length: int | None = None

    def __len__(self) -> int:
        # Lightning reads the length once, as every epoch's: a legacy epoch's own length would cut later epochs short.
        # A shorter legacy remainder ends its epoch by running out.
        if not self._is_legacy(self.epoch):
            return len(self._epoch_batches(self.epoch))
        if self._regular_length is None:
            self._regular_length = len(self._draw_batches(self.epoch))
        return self._regular_length

    def _is_legacy(self, epoch: int) -> bool:
        return self.legacy is not None and int(self.legacy["epoch"]) == epoch

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        if self._batches is None or self._batches[0] != epoch:
            if self._is_legacy(epoch):  # the batches before `start` were trained by the legacy script: never yielded
                batches = [[] for _ in range(int(self.legacy["start"]))] + [list(b) for b in self.legacy["batches"]]
            else:
                batches = self._draw_batches(epoch)
            self._batches = (epoch, batches)
        return self._batches[1]

    def _draw_batches(self, epoch: int) -> list[list[int]]:
        import torch

        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.examples), generator=generator).tolist()
        step = self.batch_size * self.world_size
        batches = []
        for start in range(0, len(order), step):
            chunk = order[start: start + step]
            if len(chunk) < self.world_size:  # too few left to give every rank one example
                break
            share = -(-len(chunk) // self.world_size)
            mine = chunk[self.rank * share: (self.rank + 1) * share]
            if not mine:  # uneven tail: ranks past the end repeat the chunk's start (documented padding)
                mine = chunk[: share]
            batches.append(mine)
        return batches

    def state_dict(self) -> dict[str, Any]:
        state = {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "world_size": self.world_size}
        if self.legacy is not None:
            state["legacy"] = self.legacy
        return state

    def load_state_dict(self, state: dict[str, int]) -> None:
        problem = order_mismatch(state, self.seed, self.world_size)
        if problem:
            raise DataError(problem)
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self.legacy = state.get("legacy")
        if self.legacy is not None and (self.world_size != 1 or any(i >= len(self.examples) for b in
                                                                     self.legacy["batches"] for i in b)):
            raise DataError("the checkpoint continues a legacy epoch on one device over the same training split; "
                            "resume on one device with the data set it was trained on")
        self._batches = None
        self._started = True

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._started and self.offset >= len(self._epoch_batches(self.epoch)):
            self.epoch, self.offset = self.epoch + 1, 0
        self._started = True
        batches = self._epoch_batches(self.epoch)[self.offset:]
        return self._generate(batches, self.epoch, self.offset)

    def _generate(self, batches: list[list[int]], epoch: int, offset: int) -> Iterator[dict[str, Any]]:
        import torch
        from torch.utils.data import DataLoader

        # A private generator: building the DataLoader iterator must not draw from the global RNG, or a resumed
        # run's dropout would differ from an uninterrupted one.
        loader = DataLoader(
            self.examples, batch_sampler=batches, num_workers=self.num_workers,
            collate_fn=_Collate(self.pad_id), generator=torch.Generator().manual_seed(self.seed),
        )
        for position, batch in enumerate(loader, start=offset):
            self.offset = position + 1
            batch["epoch"] = epoch
            batch["batch_in_epoch"] = position
            yield batch


def order_mismatch(state: dict, seed: int, world_size: int) -> str | None:
    """Why a saved `EpochLoader` position cannot continue with this seed and world size (the batches would differ
    from an uninterrupted run's), or None."""
    saved_seed, saved_world = state.get("seed", seed), state.get("world_size", world_size)
    if (saved_seed, saved_world) == (seed, world_size):
        return None
    if saved_seed != seed:
        return (f"the checkpoint's data order was made with training.seed={saved_seed}, not {seed}; resume with the "
                "config it was trained with")
    return (f"the checkpoint was trained by {saved_world} process(es), not {world_size}: each step's global batch "
            f"and every rank's share depend on it; resume with {saved_world} (training.devices x training.num_nodes, "
            "as the launcher starts them)")


class _Collate:
    """Picklable collate for worker processes."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[Encoded]) -> dict[str, Any]:
        return collate(batch, self.pad_id)



class CommonsenseData(L.LightningDataModule):
    """Encodes the training split once and hands each rank its `EpochLoader` (the rank is known only inside fit)."""

    def __init__(self, examples: list[Example], tokenizer, max_length: int, batch_size: int, seed: int,
                 num_workers: int = 0):
        super().__init__()
        self.examples = examples
        self.encoded = encode(examples, tokenizer, max_length)
        self.pad_id = padding_token_id(tokenizer)
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers

    def train_dataloader(self) -> EpochLoader:
        return EpochLoader(self.encoded, self.batch_size, self.seed, self.pad_id,
                           rank=self.trainer.global_rank, world_size=self.trainer.world_size,
                           num_workers=self.num_workers)
