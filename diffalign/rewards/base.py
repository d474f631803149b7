"""Reward protocol, the image range contract and the name -> factory registry."""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch

RANGE_EPS = 1e-3  # slack on the [0,1] contract for decoder rounding; far below a [-1,1] or normalised image
REWARDS: dict[str, Callable[..., Reward]] = {}
Factory = TypeVar("Factory", bound=Callable[..., "Reward"])


class Reward(ABC):
    """Scores images in [0,1] (float [B,3,H,W]) against B prompts; returns float32 scores [B].

    ``differentiable`` says whether gradients of the scores reach the images. A reward whose ``uses_metadata`` is
    True also receives each prompt's metadata (a dict per image, from a jsonl prompt file: the colour or count the
    prompt asks for); ``score`` may return ``(scores, info)`` with ``info`` a dict of per-image tensors to log,
    which :meth:`details` returns and ``__call__`` drops.
    """

    name: str = "reward"
    differentiable: bool = True
    uses_metadata: bool = False

    def __call__(self, images: torch.Tensor, prompts: Sequence[str],
                 metadata: Sequence[Mapping[str, Any]] | None = None) -> torch.Tensor:
        return self.details(images, prompts, metadata)[0]

    def details(self, images: torch.Tensor, prompts: Sequence[str],
                metadata: Sequence[Mapping[str, Any]] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(scores [B], info) where info holds the extra per-image values the reward reports (may be empty)."""
        check_images(images, self.name)
        prompts = check_prompts(prompts, images.shape[0], self.name)
        extra = {}
        if self.uses_metadata:
            extra["metadata"] = check_metadata(metadata, len(prompts), self.name)
        out = self.score(images, prompts, **extra)
        scores, info = out if isinstance(out, tuple) else (out, {})
        return scores.float(), info

    @abstractmethod
    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Scores [B] (or (scores, info)) for images already checked against the contract; rewards with
        ``uses_metadata`` take a third argument, ``metadata``: a list of B dicts."""


def check_metadata(metadata: Sequence[Mapping[str, Any]] | None, batch: int, name: str) -> list[dict]:
    """Per-image metadata as a list of ``batch`` dicts (empty dicts when none was given), or ValueError."""
    if metadata is None:
        return [{} for _ in range(batch)]
    if isinstance(metadata, Mapping) or len(metadata) != batch or not all(isinstance(m, Mapping) for m in metadata):
        raise ValueError(f"{name}: metadata must be a list of {batch} dicts, one per image; got {metadata!r:.80}")
    return [dict(m) for m in metadata]


def check_images(images: Any, name: str = "reward") -> None:
    """Raise ValueError unless ``images`` is a finite float tensor [B,3,H,W] with values in [0,1]."""
    expected = "images must be a float tensor [B,3,H,W] with values in [0,1]"
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        found = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name}: {expected}; got {found}")
    if images.ndim != 4 or images.shape[0] == 0 or images.shape[1] != 3:
        raise ValueError(f"{name}: {expected}; got shape {tuple(images.shape)}")
    lo, hi = torch.stack(torch.aminmax(images.detach().float())).tolist()   # one host sync, not two
    if not (-RANGE_EPS <= lo and hi <= 1 + RANGE_EPS):  # also False for NaN
        raise ValueError(
            f"{name}: {expected}; got values in [{lo:.4g}, {hi:.4g}]. Map [-1,1] images with (x + 1) / 2 and do not "
            "pass CLIP-normalised pixels: each reward does its own normalisation."
        )


def check_prompts(prompts: Sequence[str], batch: int, name: str = "reward") -> list[str]:
    """The prompts as a list of ``batch`` strings, or ValueError."""
    if isinstance(prompts, str) or len(prompts) != batch:
        raise ValueError(f"{name}: expected a list of {batch} prompts, one per image; got {prompts!r:.80}")
    return list(prompts)


def register(name: str) -> Callable[[Factory], Factory]:
    """Decorator: add a factory to :data:`REWARDS` under ``name``."""

    def add(factory: Factory) -> Factory:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is registered twice")
        REWARDS[name] = factory
        return factory

    return add


def build_reward(name: str, **options: Any) -> Reward:
    """Build the reward registered as ``name``; unknown names and options are errors."""
    factory = REWARDS.get(name)
    if factory is None:
        raise ValueError(f"unknown reward {name!r}; available rewards: {', '.join(sorted(REWARDS))}")
    check_options(name, factory, options)
    reward = factory(**options)
    reward.name = name
    return reward


def check_options(name: str, factory: Callable[..., Reward], options: Mapping[str, Any]) -> None:
    """Raise ValueError naming the reward for options the factory does not take, or required ones left out."""
    params = inspect.signature(factory).parameters
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise ValueError(
            f"reward {name!r}: unknown option(s) {', '.join(unknown)}; accepted: {', '.join(params) or 'none'}"
        )
    missing = [p for p, spec in params.items() if spec.default is inspect.Parameter.empty and p not in options]
    if missing:
        raise ValueError(f"reward {name!r}: missing required option(s) {', '.join(missing)}")


def reward_from_config(spec: str | Mapping[str, Any] | Reward) -> Reward:
    """A reward from a config value: a name, or a mapping ``{name: ..., **options}`` (a Reward passes through)."""
    if isinstance(spec, Reward):
        return spec
    if isinstance(spec, str):
        return build_reward(spec)
    if isinstance(spec, Mapping):
        options = dict(spec)
        name = options.pop("name", None)
        if not isinstance(name, str):
            raise ValueError(f"a reward mapping needs a 'name' key (one of: {', '.join(sorted(REWARDS))}); got {spec}")
        return build_reward(name, **options)
    raise TypeError(f"a reward config is a name or a mapping with 'name'; got {type(spec).__name__}")
