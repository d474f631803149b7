"""A generated preference world for the demo and tests: the preferred image matches the prompt's colour.

Each pair is a prompt like "a red circle on a grey background", a winner drawn in the named colour and a
loser drawn in another colour, written as PNG files and a ``pairs.jsonl`` (the project's own JSONL format).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square")


def draw(colour: tuple[int, int, int], shape: str, size: int, rng: np.random.Generator) -> Image.Image:
    """A shape of one colour at a random place on a noisy grey background."""
    background = rng.normal(128, 12, (size, size, 3)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(background)
    r = int(size * rng.uniform(0.2, 0.35))
    cx, cy = rng.integers(r, size - r, 2)
    box = (int(cx - r), int(cy - r), int(cx + r), int(cy + r))
    pen = ImageDraw.Draw(image)
    (pen.ellipse if shape == "circle" else pen.rectangle)(box, fill=colour)
    return image


def write_toy_pairs(directory: str | Path, num_pairs: int = 64, size: int = 64, seed: int = 0) -> Path:
    """Write ``num_pairs`` pairs under ``directory``; returns the path of ``pairs.jsonl``."""
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    lines = []
    for i in range(num_pairs):
        want, shape = names[i % len(names)], SHAPES[(i // len(names)) % len(SHAPES)]
        other = names[(names.index(want) + 1 + int(rng.integers(len(names) - 1))) % len(names)]
        paths = {}
        for role, colour in (("chosen", want), ("rejected", other)):
            rel = f"images/{i:05d}_{role}.png"
            draw(COLOURS[colour], shape, size, rng).save(directory / rel)
            paths[role] = rel
        lines.append(json.dumps({"prompt": f"a {want} {shape} on a grey background", **paths}))
    out = directory / "pairs.jsonl"
    out.write_text("\n".join(lines) + "\n")
    return out
