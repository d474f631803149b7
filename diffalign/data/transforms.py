"""Deterministic image transforms for preference pairs.

An image goes: RGB (transparency composited on white, 16-bit greyscale scaled to 8 bits) ->
resize the short side to ``resolution`` (bicubic, antialiased) -> square crop
(center or random) -> optional horizontal flip -> float32 CHW tensor in [-1, 1]. Alongside the pixels we
record what SDXL's micro-conditioning needs: the original ``(height, width)`` before the resize and the
crop's ``(top, left)`` in the resized image.

Randomness never comes from global state: every item gets its own ``random.Random`` derived from the integers
``(seed, epoch, row)`` through a numpy ``SeedSequence``, so results do not depend on worker processes, on the
order items are fetched in, or on resuming. Random crops are drawn as fractions of the available margin, so
the winner and loser of a pair can share one decision even when their sizes differ.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

RESAMPLE = Image.Resampling.BICUBIC  # PIL widens the filter when shrinking, so this is antialiased
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class Augment:
    """One image's random decisions. ``crop_frac`` is (y, x) in [0, 1) of the margin; None = center crop."""

    crop_frac: tuple[float, float] | None
    flip: bool


@dataclass(frozen=True)
class Transformed:
    pixels: torch.Tensor  # float32 [3, R, R] in [-1, 1]
    original_size: tuple[int, int]  # (height, width) before the resize
    crop: tuple[int, int]  # (top, left) in the resized image, before any flip


def item_rng(seed: int, epoch: int, row: int) -> random.Random:
    """A generator that depends only on the integers (seed, epoch, row): stable across processes and runs."""
    entropy = [int(seed) & _MASK64, int(epoch) & _MASK64, int(row) & _MASK64]
    words = np.random.SeedSequence(entropy).generate_state(4, dtype=np.uint64)
    return random.Random(int.from_bytes(words.tobytes(), "little"))


def draw_augment(rng: random.Random, crop: str, hflip: float) -> Augment:
    """Always consumes three draws (crop y, crop x, flip), whatever the settings: a simple, fixed stream."""
    fy, fx, f_flip = rng.random(), rng.random(), rng.random()
    return Augment(crop_frac=(fy, fx) if crop == "random" else None, flip=f_flip < hflip)


def draw_pair_augments(rng: random.Random, crop: str, hflip: float, paired: bool) -> tuple[Augment, Augment]:
    """(winner, loser) decisions: one shared decision when ``paired``, else one each (winner drawn first)."""
    first = draw_augment(rng, crop, hflip)
    return (first, first) if paired else (first, draw_augment(rng, crop, hflip))


def resized_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """Size after resizing the short side to ``resolution``; the long side is floored (torchvision's rule)."""
    if height <= width:
        return resolution, resolution * width // height
    return resolution * height // width, resolution


def crop_offsets(size: tuple[int, int], resolution: int, aug: Augment) -> tuple[int, int]:
    """(top, left) of the ``resolution`` square inside a resized image of ``size`` = (height, width)."""
    margin_y, margin_x = size[0] - resolution, size[1] - resolution
    if aug.crop_frac is None:  # same rounding as torchvision's CenterCrop and the diffusers SDXL scripts
        return int(round(margin_y / 2.0)), int(round(margin_x / 2.0))
    fy, fx = aug.crop_frac
    return min(int(fy * (margin_y + 1)), margin_y), min(int(fx * (margin_x + 1)), margin_x)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB: transparency is composited on white (not dropped, which would show whatever
    colour the transparent pixels happen to hold), and 16-bit greyscale is scaled to 8 bits (not clipped)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode != "I" or values.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(values / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """uint8 RGB image -> float32 [3, H, W] in [-1, 1]."""
    array = np.array(image, dtype=np.uint8)  # a writable copy
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(127.5).sub_(1.0).contiguous()


def unit_pixels(image: Image.Image) -> torch.Tensor:
    """Any PIL image -> float32 [3, H, W] in [0, 1], the reward contract."""
    return (to_tensor(to_rgb(image)) + 1) / 2


def transform_image(image: Image.Image, resolution: int, aug: Augment) -> Transformed:
    """Resize, crop, flip and normalise one image, recording its original size and crop."""
    image = to_rgb(image)
    original = (image.height, image.width)
    size = resized_size(*original, resolution)
    if size != original:
        image = image.resize((size[1], size[0]), RESAMPLE)
    top, left = crop_offsets(size, resolution, aug)
    image = image.crop((left, top, left + resolution, top + resolution))
    # The flip comes after the crop and does NOT change the recorded (top, left): it stays in the unflipped
    # resized image's coordinates. (The diffusers SDXL script flips before cropping, so its coordinates are in
    # the flipped frame, i.e. left' = margin_x - left; for a random crop both are uniform over the margin, and
    # for a center crop they differ by at most one pixel of rounding.)
    if aug.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return Transformed(to_tensor(image), original, (top, left))
