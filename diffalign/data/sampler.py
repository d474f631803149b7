"""Epoch-seeded batch order that can start anywhere, so resuming never replays the dataset."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

#: A dataset's own epoch order: (seed, epoch) -> a permutation of its items, or None for no preference.
EpochOrder = Callable[[int, int], "Sequence[int] | np.ndarray | None"]


class EpochBatches:
    """Batches of dataset indices for one process in one epoch.

    The epoch's order is ``order(seed, epoch)`` when the dataset gives one (``PreferencePairs.epoch_order``: a
    few parquet row groups at a time), else a permutation seeded by (seed, epoch). Global batch k holds
    ``perm[k*B*W : (k+1)*B*W]``; process r takes its r-th slice of B. The incomplete last global batch is
    dropped. ``start`` skips the first global batches without touching them. Either order depends on (seed,
    epoch) only, never on the process count, so every process computes the same one.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, epoch: int, start: int = 0,
                 rank: int = 0, world: int = 1, order: EpochOrder | None = None) -> None:
        self.num_items, self.batch_size, self.seed, self.epoch = num_items, batch_size, seed, epoch
        self.start, self.rank, self.world, self.order = start, rank, world, order
        self._perm: np.ndarray | None = None

    @staticmethod
    def per_epoch(num_items: int, batch_size: int, world: int = 1) -> int:
        return num_items // (batch_size * world)

    def __len__(self) -> int:
        return max(self.per_epoch(self.num_items, self.batch_size, self.world) - self.start, 0)

    def permutation(self) -> np.ndarray:
        """The epoch's item order (computed once: the trainer iterates the batches twice, loader and zip)."""
        if self._perm is None:
            perm = self.order(self.seed, self.epoch) if self.order is not None else None
            if perm is None:
                gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
                perm = torch.randperm(self.num_items, generator=gen).numpy()
            self._perm = _checked_permutation(np.asarray(perm, dtype=np.int64), self.num_items)
        return self._perm

    def __iter__(self) -> Iterator[list[int]]:
        perm = self.permutation()
        glob = self.batch_size * self.world
        for k in range(self.start, self.per_epoch(self.num_items, self.batch_size, self.world)):
            lo = k * glob + self.rank * self.batch_size
            yield perm[lo: lo + self.batch_size].tolist()


def _checked_permutation(perm: np.ndarray, n: int) -> np.ndarray:
    if perm.shape != (n,) or (n and (perm.min() < 0 or perm.max() >= n
                                     or not np.all(np.bincount(perm, minlength=n) == 1))):
        raise ValueError(f"a dataset's epoch_order must be a permutation of its {n} items; got {perm.shape[0]} "
                         "indices that are not")
    return perm


def block_window_order(blocks: np.ndarray, window: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of the items that reads a few blocks at a time: the blocks (``blocks[i]`` = item i's block,
    e.g. its parquet row group) are put in a random order, cut into consecutive windows of ``window`` blocks, and
    the items of each window are shuffled together. A reader caching ``window`` blocks then reads each block once
    per epoch, while a batch still mixes ``window`` random places of the set.

    Deterministic in (seed, epoch); drawn with ``Generator.random`` only (the most stable numpy stream), from a
    seed sequence apart from the item and torch streams.
    """
    blocks = np.asarray(blocks)
    if window < 1:
        raise ValueError(f"window = {window} must be at least 1 (0 means a full permutation, chosen by the caller)")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch), 0xB10C])))
    ids, inverse = np.unique(blocks, return_inverse=True)
    rank = np.argsort(rng.random(ids.size), kind="stable")           # block ids in the epoch's order ...
    position = np.empty(ids.size, dtype=np.int64)
    position[rank] = np.arange(ids.size)                              # ... and each block's place in it
    window_of = position[inverse.reshape(-1)] // window
    return np.lexsort((rng.random(blocks.size), window_of))


def example_seeds(seed: int, epoch: int, num_items: int, indices: list[int] | torch.Tensor) -> torch.Tensor:
    """One seed per drawn example from (seed, epoch, its index in the epoch's item list): unique in a run, and the
    same whatever the batch size, process count or position, so an example's noise can follow the example (and
    be reproduced ahead of training, as precomputed reference errors are)."""
    indices = torch.as_tensor(indices, dtype=torch.int64)
    return seed * 1_000_000_007 + epoch * num_items + indices
