"""Prompt-only data (AlignProp training, evaluation): a text file with one prompt per line, or a list."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from diffalign.data.pairs import DataError


def read_prompts(source: str | Sequence[str] | None, key: str = "data.prompts") -> list[str]:
    """The prompts of a file (blank lines and lines starting with # skipped) or of a list; never empty."""
    if source is None or source == "":
        raise DataError(f"`{key}` is not set: give a text file with one prompt per line, or a list of prompts")
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise DataError(f"{path}: prompt file not found (`{key}`)")
        lines = path.read_text(encoding="utf-8").splitlines()
        prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        where = str(path)
    else:
        bad = [i for i, p in enumerate(source) if not isinstance(p, str)]
        if bad:
            raise DataError(f"`{key}`: entry {bad[0]} is {source[bad[0]]!r}, not a string")
        prompts, where = [p.strip() for p in source], f"`{key}`"
    if not prompts:
        raise DataError(f"{where}: no prompts")
    return prompts


class PromptDataset:
    """Prompts as a map-style dataset; batches carry the prompts and the square image size to generate."""

    def __init__(self, source: str | Sequence[str] | None, resolution: int) -> None:
        self.prompts = read_prompts(source)
        self.size = (resolution, resolution)
        self.repeats = 1

    def repeat_to(self, n: int) -> None:
        """Repeat the whole list in each epoch so that it holds at least n items (one global batch)."""
        self.repeats = max(1, -(-n // len(self.prompts)))

    def __len__(self) -> int:
        return len(self.prompts) * self.repeats

    def __getitem__(self, index: int) -> tuple[int, str]:
        index %= len(self.prompts)
        return index, self.prompts[index]

    def set_epoch(self, epoch: int) -> None:
        """Nothing to re-seed: a prompt has no transforms."""

    def collate(self, items: list[tuple[int, str]]) -> dict:
        return {"prompts": [p for _, p in items], "indices": torch.tensor([i for i, _ in items]), "size": self.size}
