"""Preference pairs as a folder of folders: each subfolder holds ``prompt.txt``, ``chosen.<ext>`` and
``rejected.<ext>`` (any image extension PIL reads), the layout people export from labelling tools.

Subfolders are taken in sorted name order; a pair's ``row`` is its position in that order, and error messages
name the subfolder. The layout is checked when the set is opened (every subfolder has the three files, exactly
one of each); images are decoded per item.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = {s.lower() for s, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def _one_image(folder: Path, stem: str) -> Path:
    from diffalign.data.pairs import DataError

    found = [p for p in folder.iterdir() if p.stem == stem and p.suffix.lower() in IMAGE_SUFFIXES]
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise DataError(f"{folder}: {what} {stem}.<image> file(s); each pair folder needs exactly one "
                        f"{stem} image beside prompt.txt")
    return found[0]


class FolderPairs:
    """The pair folders under ``root``: prompt text and (chosen, rejected) image paths, checked on open."""

    def __init__(self, root: Path, max_pairs: int | None = None) -> None:
        from diffalign.data.pairs import DataError

        if not root.is_dir():
            raise DataError(f"{root}: not a folder of pair folders")
        folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise DataError(f"{root}: no pair folders (each holds prompt.txt, chosen.<ext>, rejected.<ext>)")
        self.root, self.num_rows = root, len(folders)
        folders = folders[:max_pairs]
        self.records = []
        for folder in folders:
            prompt = folder / "prompt.txt"
            if not prompt.is_file():
                raise DataError(f"{folder}: no prompt.txt")
            self.records.append((prompt.read_text(encoding="utf-8").strip(), _one_image(folder, "chosen"),
                                 _one_image(folder, "rejected")))
        self.rows = np.arange(len(self.records), dtype=np.int64)

    def prompt(self, i: int) -> str:
        return self.records[i][0]

    def images(self, i: int) -> tuple[Image.Image, Image.Image]:
        from diffalign.data.pairs import _read_image

        _, chosen, rejected = self.records[i]
        where = f"{self.root}: row {i} ({chosen.parent.name}): cannot read"
        return (_read_image(chosen, f"{where} {chosen.name}"), _read_image(rejected, f"{where} {rejected.name}"))
