"""Rewards computed from pixels alone: brightness, saturation, target colour and DDPO's JPEG size rewards."""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from diffalign.rewards.base import Reward, register

SATURATION_MIN_VALUE = 1e-2  # HSV value below which saturation's denominator is clamped (keeps black finite)


class PixelReward(Reward):
    """A differentiable, prompt-independent reward ``fn(images [B,3,H,W]) -> [B]``."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.fn = fn

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.fn(images)


def mean_brightness(images: torch.Tensor) -> torch.Tensor:
    """Mean pixel value over channels and space: [B,3,H,W] -> [B]."""
    return images.mean(dim=(1, 2, 3))


def mean_saturation(images: torch.Tensor) -> torch.Tensor:
    """Mean HSV saturation (max - min) / max over pixels: [B,3,H,W] -> [B]."""
    value = images.amax(dim=1)  # [B,H,W]
    chroma = value - images.amin(dim=1)
    return (chroma / value.clamp_min(SATURATION_MIN_VALUE)).mean(dim=(1, 2))


def colour_distance(images: torch.Tensor, colour: tuple[float, float, float]) -> torch.Tensor:
    """Minus the mean Euclidean RGB distance between each pixel and ``colour``: [B,3,H,W] -> [B]."""
    target = torch.tensor(colour, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return -torch.linalg.vector_norm(images - target, dim=1).mean(dim=(1, 2))


@register("brightness")
def brightness() -> Reward:
    """Mean pixel value in [0,1]."""
    return PixelReward(mean_brightness)


@register("saturation")
def saturation() -> Reward:
    """Mean HSV saturation in [0,1]."""
    return PixelReward(mean_saturation)


@register("target_colour")
def target_colour(*, colour: Sequence[float]) -> Reward:
    """Minus the mean RGB distance to ``colour`` ([r, g, b] in [0,1]); 0 for an exact match."""
    values = tuple(float(c) for c in colour)
    if len(values) != 3 or not all(0.0 <= c <= 1.0 for c in values):
        raise ValueError(f"reward 'target_colour': colour must be [r, g, b] with values in [0,1]; got {colour!r}")
    return PixelReward(functools.partial(colour_distance, colour=values))


class JpegSize(Reward):
    """``sign`` * JPEG file size in kB (1 kB = 1000 bytes) at ``quality``; not differentiable."""

    differentiable = False

    def __init__(self, sign: float, quality: int) -> None:
        self.sign, self.quality = sign, quality

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        arrays = pixels.permute(0, 2, 3, 1).cpu().numpy()  # [B,H,W,3]
        sizes = [jpeg_bytes(array, self.quality) / 1000 for array in arrays]
        return self.sign * torch.tensor(sizes, dtype=torch.float32, device=images.device)


def jpeg_bytes(array: np.ndarray, quality: int) -> int:
    """Size in bytes of an RGB uint8 array [H,W,3] saved as JPEG."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.tell()


@register("jpeg_compressibility")
def jpeg_compressibility(*, quality: int = 95) -> Reward:
    """Minus the JPEG size in kB (DDPO's compressibility reward)."""
    return JpegSize(-1.0, quality)


@register("jpeg_incompressibility")
def jpeg_incompressibility(*, quality: int = 95) -> Reward:
    """The JPEG size in kB (DDPO's incompressibility reward)."""
    return JpegSize(1.0, quality)
