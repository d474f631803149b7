"""Work shared by the processes of a launched group (torchrun, accelerate launch): who does what, barriers.

Batches are cut from the job list exactly as in a single process and dealt round-robin, so every image is
made in the same batch as it would be alone (byte-identical PNGs at the same CPU thread count; tested), and each
process writes its own files.
Uses torch.distributed directly (nccl on GPUs, gloo on CPUs); a single process needs none of it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Workers:
    rank: int = 0
    world: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def rounds(self, batches: list) -> Iterator[tuple[list | None, int]]:
        """(this process's batch or None, images made by all processes) per round of `world` batches."""
        for start in range(0, len(batches), self.world):
            group = batches[start:start + self.world]
            yield (group[self.rank] if self.rank < len(group) else None), sum(len(b) for b in group)


def is_main_process() -> bool:
    """Rank 0 of a launched group, or a single process."""
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def launched() -> Iterator[Workers]:
    """The process group set up by the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK), torn down after."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = f"cuda:{local}" if cuda else "cpu"
    if world == 1:
        yield Workers(device="cuda" if cuda else "cpu")
        return
    created = not dist.is_initialized()
    if created:
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield Workers(rank, world, device)
    finally:
        if created:
            dist.destroy_process_group()
