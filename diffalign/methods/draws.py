"""Each pair's random draws from its own generator, so they follow the pair and not the batch it lands in.

A batch's ``seeds`` (one per pair, from ``data.sampler.example_seeds``) seed one CPU generator per pair. Every
draw is taken pair by pair from those generators, whatever the batch size, the process count or the position of
the pair: 2 processes x 1 pair draw exactly what 1 process x 2 pairs draws, and a pair's draws can be made
ahead of training (precomputed reference errors). Pair tensors are laid out ``[winners; losers]`` ([2B, ...]).
"""

from __future__ import annotations

import torch
from torch import Tensor


class PairDraws:
    """One generator per pair. Each method takes its draws in a fixed order, so the n-th draw of a pair is the
    same number in every run: DPO and MaPO take (latent samples, t, noise); InPO (latent samples, t, then the
    inversion's noise move by move)."""

    def __init__(self, seeds: Tensor | list[int], device: torch.device | str) -> None:
        self.gens = [torch.Generator().manual_seed(int(s)) for s in torch.as_tensor(seeds).tolist()]
        self.device = device

    @classmethod
    def of(cls, batch: dict, num_pairs: int, device: torch.device | str) -> PairDraws:
        """The batch's pair generators. A batch built outside the trainer (no ``seeds``) gets seeds from torch's
        global generator, so ``torch.manual_seed`` still fixes its draws."""
        seeds = batch.get("seeds")
        if seeds is None:
            seeds = torch.randint(0, 2**62, (num_pairs,))
        if len(seeds) != num_pairs:
            raise ValueError(f"{len(seeds)} seeds for {num_pairs} pairs")
        return cls(seeds, device)

    def __len__(self) -> int:
        return len(self.gens)

    def each(self, shape: torch.Size | tuple[int, ...]) -> Tensor:
        """A separate standard normal for the winner and the loser of every pair: [2B, *shape]."""
        draws = torch.stack([torch.randn((2, *shape), generator=g) for g in self.gens], dim=1)   # [2, B, ...]
        return draws.flatten(0, 1).to(self.device)

    def shared(self, shape: torch.Size | tuple[int, ...]) -> Tensor:
        """One standard normal per pair, the same for its winner and loser: [2B, *shape]."""
        draws = torch.stack([torch.randn(tuple(shape), generator=g) for g in self.gens])
        return draws.repeat(2, *([1] * len(shape))).to(self.device)

    def levels(self, schedule) -> Tensor:
        """One training level per pair from ``schedule.sample_t``, shared by its winner and loser: [2B]."""
        t = torch.cat([schedule.sample_t(1, "cpu", generator=g) for g in self.gens])
        return t.to(self.device).repeat(2)
