"""Preference batches: their layout, caption dropout, and turning one into latents through the model's encoders.

Every pair batch, cached or not, stacks the images as ``[winners; losers]`` on the batch axis (``2B``), so
``x[:B]`` are the winners and ``x[B:]`` their losers. A new kind of data only has to produce that layout; the
model contract does not change.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from diffalign.models.base import Cond, DiffusionModel


def winners_then_losers(pairs: Sequence[Tensor]) -> Tensor:
    """B tensors of shape [2, ...] (winner, loser) -> [2B, ...] ordered w_1..w_B, l_1..l_B."""
    return torch.stack(list(pairs), dim=1).flatten(0, 1)


def caption_dropped(rng: random.Random, probability: float) -> bool:
    """Whether a pair's prompt is replaced by the empty prompt this epoch: the FIRST draw of the pair's own
    generator (``transforms.item_rng(seed, epoch, row)``), so cached and uncached runs, any worker count and a
    resume all drop the same captions. Always takes the draw, so the augmentation draws after it do not move."""
    return rng.random() < probability


def pair_inputs(model: DiffusionModel, batch: dict) -> tuple[Tensor, Tensor, Cond]:
    """A preference batch -> (latent mean, latent std [2B, ...] as [winners; losers], Cond [2B]).

    Uncached batches carry ``pixels`` [2B,3,H,W] and ``prompts`` (B); cached ones carry ``latent_mean``,
    ``latent_std`` [2B, ...] and ``cond`` (a dict of Cond fields for the B prompts). Both carry
    ``original_sizes`` and ``crops`` [2B,2].
    """
    from diffalign.models.base import Cond

    if "latent_mean" in batch:
        mean, std = batch["latent_mean"].to(model.device), batch["latent_std"].to(model.device)
        cond = Cond(**batch["cond"]).to(model.device)
    else:
        mean, std = model.encode_images(batch["pixels"])
        cond = model.encode_prompt(batch["prompts"])
    size = mean.shape[-1] * model.latent_factor
    cond = model.add_time_ids(cond.repeat(2), batch["original_sizes"], batch["crops"], (size, size))
    return mean, std, cond


def pair_latents(model: DiffusionModel, batch: dict, generator: torch.Generator | None = None) -> tuple[Tensor, Cond]:
    """A preference batch -> (x0 [2B, ...] as [winners; losers], Cond [2B]); x0 is a fresh sample of each image's
    latent distribution (see :func:`pair_inputs`)."""
    mean, std, cond = pair_inputs(model, batch)
    return model.sample_latents(mean, std, generator), cond
