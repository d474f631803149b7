"""Column layouts of preference tables (parquet files and hub datasets): which columns hold the prompt, the two
images, the preference label and the image ids. A table's layout is read from its column names.

* **Pick-a-Pic v2**: ``caption``, ``jpg_0``, ``jpg_1``, ``label_0`` (1 = image 0 preferred, 0 = image 1, 0.5 =
  tie), optionally ``image_0_uid`` / ``image_1_uid`` (used to count duplicate pairs).
* **prompt / chosen / rejected**: the binarized layout of trl's preference datasets, which image-preference sets
  such as open-image-preferences-v1-binarized use: ``chosen`` is the preferred image, so there is no label and
  no tie. Extra columns (models, categories) are ignored.

Images are bytes or datasets ``Image`` values ({"bytes", "path"}) in either layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    name: str
    prompt: str
    images: tuple[str, str]                # (image 0, image 1)
    label: str | None                      # label_0-style column; None: image 0 is always the winner
    uids: tuple[str, str] | None = None    # optional image id columns, for counting duplicates

    @property
    def required(self) -> tuple[str, ...]:
        return (self.prompt, *self.images, *((self.label,) if self.label else ()))

    def missing(self, columns: Sequence[str]) -> list[str]:
        return [c for c in self.required if c not in columns]

    def has_uids(self, columns: Sequence[str]) -> bool:
        return self.uids is not None and all(c in columns for c in self.uids)


PICKAPIC = Layout("Pick-a-Pic", "caption", ("jpg_0", "jpg_1"), "label_0", ("image_0_uid", "image_1_uid"))
BINARIZED = Layout("prompt/chosen/rejected", "prompt", ("chosen", "rejected"), None)
LAYOUTS = (PICKAPIC, BINARIZED)
IMAGE_COLUMNS = frozenset(c for layout in LAYOUTS for c in layout.images)


class LayoutError(ValueError):
    """No layout's columns are all present; ``missing`` lists those of the nearest layout."""

    def __init__(self, missing: list[str], columns: Sequence[str]) -> None:
        self.missing, self.columns = missing, list(columns)
        super().__init__(f"missing column(s) {', '.join(missing)}; found columns: {', '.join(columns) or '(none)'} "
                         f"(a preference table has {' or '.join(', '.join(x.required) for x in LAYOUTS)})")


def detect(columns: Sequence[str]) -> Layout:
    """The first layout whose required columns are all present (Pick-a-Pic first); ``LayoutError`` naming the
    missing columns of the layout with the most present otherwise."""
    for layout in LAYOUTS:
        if not layout.missing(columns):
            return layout
    nearest = min(LAYOUTS, key=lambda layout: len(layout.missing(columns)))  # the first on a tie
    raise LayoutError(nearest.missing(columns), columns)
