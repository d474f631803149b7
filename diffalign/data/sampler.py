"""Epoch-seeded batch order that can start anywhere, so resuming never replays the dataset."""

from __future__ import annotations

from collections.abc import Iterator

import torch


class EpochBatches:
    """Batches of dataset indices for one process in one epoch.

    The epoch's order is a permutation seeded by (seed, epoch). Global batch k holds
    ``perm[k*B*W : (k+1)*B*W]``; process r takes its r-th slice of B. The incomplete last global batch is
    dropped. ``start`` skips the first global batches without touching them.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, epoch: int, start: int = 0,
                 rank: int = 0, world: int = 1) -> None:
        self.num_items, self.batch_size, self.seed, self.epoch = num_items, batch_size, seed, epoch
        self.start, self.rank, self.world = start, rank, world

    @staticmethod
    def per_epoch(num_items: int, batch_size: int, world: int = 1) -> int:
        return num_items // (batch_size * world)

    def __len__(self) -> int:
        return max(self.per_epoch(self.num_items, self.batch_size, self.world) - self.start, 0)

    def __iter__(self) -> Iterator[list[int]]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.num_items, generator=gen).tolist()
        glob = self.batch_size * self.world
        for k in range(self.start, self.per_epoch(self.num_items, self.batch_size, self.world)):
            lo = k * glob + self.rank * self.batch_size
            yield perm[lo: lo + self.batch_size]


def example_seeds(seed: int, epoch: int, num_items: int, indices: list[int] | torch.Tensor) -> torch.Tensor:
    """One seed per drawn example from (seed, epoch, its index in the epoch's item list): unique in a run, and the
    same whatever the batch size, process count or position, so an example's noise can follow the example (and
    be reproduced ahead of training, as precomputed reference errors are)."""
    indices = torch.as_tensor(indices, dtype=torch.int64)
    return seed * 1_000_000_007 + epoch * num_items + indices
