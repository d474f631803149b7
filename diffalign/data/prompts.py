"""Prompt-only data (AlignProp and online RL training, evaluation): a text file with one prompt per line, a
jsonl file with a ``prompt`` field per line (the other fields are the prompt's metadata, which rewards receive:
``{"prompt": "a red ball", "colour": "red"}``), or a list."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from diffalign.data.pairs import DataError


def read_prompts(source: str | Sequence[str] | None, key: str = "data.prompts") -> list[str]:
    """The prompts of a file (blank lines and lines starting with # skipped) or of a list; never empty."""
    return read_prompt_records(source, key)[0]


def read_prompt_records(source: str | Sequence[str] | None,
                        key: str = "data.prompts") -> tuple[list[str], list[dict]]:
    """(prompts, metadata): the metadata of a jsonl line is its fields other than ``prompt`` (empty otherwise)."""
    if isinstance(source, (str, Path)) and str(source).endswith(".jsonl"):
        return _read_jsonl(Path(source), key)
    prompts = _read_plain(source, key)
    return prompts, [{} for _ in prompts]


def _read_jsonl(path: Path, key: str) -> tuple[list[str], list[dict]]:
    if not path.is_file():
        raise DataError(f"{path}: prompt file not found (`{key}`)")
    prompts, metadata = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{n}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
            raise DataError(f"{path}:{n}: each line needs a non-empty string field \"prompt\"")
        prompts.append(record.pop("prompt").strip())
        metadata.append(record)
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts, metadata


def _read_plain(source: str | Sequence[str] | None, key: str) -> list[str]:
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
        self.prompts, self.metadata = read_prompt_records(source)
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
        return {"prompts": [p for _, p in items], "indices": torch.tensor([i for i, _ in items]), "size": self.size,
                "metadata": [self.metadata[i] for i, _ in items]}
