"""Weighted sums of rewards."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from diffalign.rewards.base import Reward, register, reward_from_config


class WeightedSum(Reward):
    """sum_i weight_i * reward_i(images, prompts); differentiable iff every component is."""

    def __init__(self, components: Sequence[tuple[float, Reward]]) -> None:
        self.components = list(components)
        self.differentiable = all(reward.differentiable for _, reward in self.components)
        self.uses_metadata = any(reward.uses_metadata for _, reward in self.components)

    def score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> torch.Tensor:
        terms = [weight * reward(images, prompts, metadata) for weight, reward in self.components]
        return torch.stack(terms).sum(dim=0)


@register("weighted_sum")
def weighted_sum(*, components: Sequence[Mapping[str, Any]]) -> Reward:
    """``components``: a list of ``{name, weight, **options}`` mappings, each built like a reward config."""
    if isinstance(components, (str, Mapping)) or not components:
        raise ValueError("reward 'weighted_sum': components must be a non-empty list of {name, weight, ...} mappings")
    return WeightedSum([_component(spec) for spec in components])


def _component(spec: Mapping[str, Any]) -> tuple[float, Reward]:
    """(weight, reward) from one ``{name, weight, **options}`` mapping."""
    if not isinstance(spec, Mapping) or "weight" not in spec:
        raise ValueError(f"reward 'weighted_sum': each component needs 'name' and 'weight'; got {spec!r}")
    options = dict(spec)
    weight = float(options.pop("weight"))
    return weight, reward_from_config(options)
