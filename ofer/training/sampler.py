"""Deterministic, resumable, sharded batch order.

The order of epoch ``e`` is a permutation drawn from ``numpy.random.default_rng([seed, e])``, so it
depends on nothing but (seed, epoch, dataset length). An epoch is cut into
``len(dataset) // batch_size`` global batches (the incomplete tail is dropped so that every step sees
exactly ``batch_size`` items and DDP ranks get equal shares); rank ``r`` of ``W`` takes the
contiguous slice ``[r * B / W, (r + 1) * B / W)`` of each global batch. The position is a pair
(epoch, batch in epoch) and a resumed sampler starts right there: no skipped batch is read.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

SAMPLER_STATE_KEYS = ("epoch", "batch_in_epoch", "num_items", "batch_size", "seed")


class DeterministicBatchSampler:
    """Infinite batch sampler over epochs; yields this rank's list of dataset indices per step.

    Use it as ``DataLoader(dataset, batch_sampler=sampler)``. The loop, not the sampler, tracks the
    consumed position (a DataLoader with workers pre-fetches ahead of what the model has seen).
    """

    def __init__(
        self,
        *,
        num_items: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        epoch: int = 0,
        batch_in_epoch: int = 0,
    ) -> None:
        if batch_size % world_size:
            raise ValueError(
                f"trainer.batch_size={batch_size} (the global batch) must be divisible by the world size {world_size}"
            )
        if num_items < batch_size:
            raise ValueError(f"the training dataset has {num_items} items, fewer than trainer.batch_size={batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, {world_size})")
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.steps_per_epoch = num_items // batch_size
        if not 0 <= batch_in_epoch < self.steps_per_epoch:
            raise ValueError(f"batch_in_epoch={batch_in_epoch} is outside [0, {self.steps_per_epoch})")
        self.start = (epoch, batch_in_epoch)
        self._perm_cache: tuple[int, np.ndarray] | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of all items in ``epoch``; shape: (num_items,)."""
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            self._perm_cache = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_items))
        return self._perm_cache[1]

    def global_batch(self, epoch: int, batch_in_epoch: int) -> list[int]:
        """Dataset indices of the whole (all-rank) batch at this position; length: batch_size."""
        lo = batch_in_epoch * self.batch_size
        return self.permutation(epoch)[lo : lo + self.batch_size].tolist()

    def local_batch(self, epoch: int, batch_in_epoch: int) -> list[int]:
        """This rank's share of :meth:`global_batch`; length: batch_size / world_size."""
        per_rank = self.batch_size // self.world_size
        return self.global_batch(epoch, batch_in_epoch)[self.rank * per_rank : (self.rank + 1) * per_rank]

    def advance(self, epoch: int, batch_in_epoch: int) -> tuple[int, int]:
        """The position after consuming the batch at (epoch, batch_in_epoch)."""
        if batch_in_epoch + 1 < self.steps_per_epoch:
            return epoch, batch_in_epoch + 1
        return epoch + 1, 0

    def __iter__(self) -> Iterator[list[int]]:
        epoch, batch = self.start
        while True:
            yield self.local_batch(epoch, batch)
            epoch, batch = self.advance(epoch, batch)

    def state_dict(self, epoch: int, batch_in_epoch: int) -> dict[str, int]:
        """Plain description of a position, stored in checkpoints."""
        return {
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "num_items": self.num_items,
            "batch_size": self.batch_size,
            "seed": self.seed,
        }
