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


# ------------------------------------------------------------------------------------------------ prompt colour
# Named colours in [0,1]; red, green, blue and yellow are the toy world's (diffalign.data.toy).
PROMPT_COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
                  "orange": (240, 140, 30), "purple": (140, 60, 180), "pink": (240, 120, 180)}
CHROMA_EPS = 1e-6


def named_colour(prompt: str, palette: dict[str, Sequence[float]], reward: str) -> str:
    """The first word of the prompt that names a palette colour; ValueError naming the prompt otherwise."""
    for word in prompt.lower().replace(",", " ").split():
        if word in palette:
            return word
    raise ValueError(f"reward {reward!r}: prompt {prompt!r} names none of the colours {', '.join(palette)}")


def chroma_weighted_colour(images: torch.Tensor) -> torch.Tensor:
    """Mean RGB of each image weighted by pixel chroma (max - min), so grey backgrounds barely count: [B,3]."""
    weight = images.amax(dim=1, keepdim=True) - images.amin(dim=1, keepdim=True)   # [B,1,H,W]
    return (images * weight).sum(dim=(2, 3)) / (weight.sum(dim=(2, 3)) + CHROMA_EPS)


class PromptColour(Reward):
    """How well the image's colourful pixels match the colour the prompt asks for: the metadata's ``colour`` when
    the prompt file gives one, else the first palette colour the prompt names.

    soft: minus the RGB distance between the chroma-weighted mean colour and the named colour (differentiable);
    hard (``match``): 1 when the named colour is the palette colour nearest that mean, else 0 (an accuracy).
    Both report ``colour_distance`` (the soft distance) as extra info.
    """

    uses_metadata = True

    def __init__(self, palette: dict[str, Sequence[float]], match: bool) -> None:
        self.palette = {name.lower(): tuple(float(c) / 255 for c in rgb) for name, rgb in palette.items()}
        self.match = match
        self.differentiable = not match

    def wanted(self, prompt: str, meta: dict) -> str:
        colour = meta.get("colour")
        if colour is None:
            return named_colour(prompt, self.palette, self.name)
        if str(colour).lower() not in self.palette:
            raise ValueError(f"reward {self.name!r}: metadata colour {colour!r} of prompt {prompt!r} is not one of "
                             f"{', '.join(self.palette)}")
        return str(colour).lower()

    def score(self, images: torch.Tensor, prompts: list[str],
              metadata: list[dict] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        names = list(self.palette)
        metadata = metadata or [{} for _ in prompts]
        table = torch.tensor([self.palette[n] for n in names], dtype=images.dtype, device=images.device)
        wanted = torch.tensor([names.index(self.wanted(p, m)) for p, m in zip(prompts, metadata, strict=True)],
                              device=images.device)
        mean = chroma_weighted_colour(images)                                         # [B,3]
        distances = torch.cdist(mean, table)                                          # [B,K]
        distance = distances.gather(1, wanted[:, None]).squeeze(1)
        info = {"colour_distance": distance.detach()}
        if self.match:
            return (distances.argmin(dim=1) == wanted).to(images.dtype), info
        return -distance, info


def _palette(colours: dict | None, reward: str) -> dict:
    palette = dict(PROMPT_COLOURS if colours is None else colours)
    bad = [n for n, rgb in palette.items() if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb)]
    if bad or not palette:
        raise ValueError(f"reward {reward!r}: colours must map names to [r, g, b] in 0..255; bad: {bad or 'empty'}")
    return palette


@register("prompt_colour")
def prompt_colour(*, colours: dict | None = None) -> Reward:
    """Minus the RGB distance (0..sqrt(3)) between the image's chroma-weighted colour and the prompt's colour."""
    return PromptColour(_palette(colours, "prompt_colour"), match=False)


@register("prompt_colour_match")
def prompt_colour_match(*, colours: dict | None = None) -> Reward:
    """1 if the image's chroma-weighted colour is nearest the colour the prompt names, else 0 (not differentiable)."""
    return PromptColour(_palette(colours, "prompt_colour_match"), match=True)
