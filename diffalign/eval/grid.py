"""Labelled image grids: one row per prompt, one column per model, captions drawn with PIL.

Layout: a header band of height :func:`header_height` holds the column captions; a left column
``LABEL_WIDTH_CELLS`` cells wide holds the word-wrapped row captions; every image fills one ``cell x cell``
square. Each caption is drawn on its own tile before pasting, so text can never spill into an image cell.
"""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

LABEL_WIDTH_CELLS = 1  # the left caption column is one cell wide
ELLIPSIS = "\u2026"
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
BAND = (0, 0, 0, 160)  # semi-opaque dark band behind per-cell captions

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def header_height(cell: int) -> int:
    """Height in pixels of the top band holding the column captions."""
    return max(24, cell // 6)


def _font(cell: int) -> Font:
    return ImageFont.load_default(size=max(10, cell // 16))


def _line_height(draw: ImageDraw.ImageDraw, font: Font) -> int:
    left, top, right, bottom = draw.textbbox((0, 0), "Hg", font=font)
    return bottom - top + 2


def _prefix_length(draw: ImageDraw.ImageDraw, text: str, font: Font, width: float, suffix: str = "") -> int:
    """Length of the longest prefix of ``text`` that, followed by ``suffix``, is at most ``width`` wide."""
    lo, hi = 0, len(text)
    while lo < hi:  # binary search: text width grows with the prefix length
        mid = (lo + hi + 1) // 2
        if draw.textlength(text[:mid].rstrip() + suffix, font=font) <= width:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Font, width: float, cut: bool = False) -> str:
    """``text`` if it is at most ``width`` pixels wide, else its longest prefix that fits with an ellipsis.

    ``cut=True`` marks ``text`` as already cut short, so it always ends in an ellipsis.
    """
    if draw.textlength(text + (ELLIPSIS if cut else ""), font=font) <= width:
        return text + (ELLIPSIS if cut else "")
    return text[: _prefix_length(draw, text, font, width, ELLIPSIS)].rstrip() + ELLIPSIS


def _split_long_word(draw: ImageDraw.ImageDraw, word: str, font: Font, width: float) -> list[str]:
    """Break a word wider than ``width`` into pieces that each fit (at least one character per piece)."""
    pieces: list[str] = []
    while word:
        size = max(1, _prefix_length(draw, word, font, width))
        pieces.append(word[:size])
        word = word[size:]
    return pieces


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Font, width: float) -> list[str]:
    """Greedy word wrap of ``text`` to lines at most ``width`` pixels wide."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if draw.textlength(candidate, font=font) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        *full, current = _split_long_word(draw, word, font, width)
        lines.extend(full)
    if current:
        lines.append(current)
    return lines


def _label_tile(text: str, width: int, height: int, font: Font) -> Image.Image:
    """A white tile with ``text`` wrapped to its width, cut with an ellipsis where it runs out of height."""
    tile = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(tile)
    pad = max(2, width // 32)
    line_h = _line_height(draw, font)
    lines = _wrap(draw, text, font, width - 2 * pad)
    max_lines = max(1, (height - 2 * pad) // line_h)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = _fit(draw, lines[-1], font, width - 2 * pad, cut=True)
    for k, line in enumerate(lines):
        draw.text((pad, pad + k * line_h), line, fill=TEXT, font=font)
    return tile


def _header_tile(text: str, width: int, height: int, font: Font) -> Image.Image:
    """A white tile with ``text`` on one line, centred, shortened with an ellipsis if too wide."""
    tile = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(tile)
    text = _fit(draw, text, font, width - 4)
    draw.text((width / 2, height / 2), text, fill=TEXT, font=font, anchor="mm")
    return tile


def _image_tile(image: Image.Image, cell: int, caption: str, font: Font) -> Image.Image:
    """``image`` resized to ``cell x cell``; a non-empty caption goes on a dark band at the bottom."""
    tile = image.convert("RGB").resize((cell, cell), Image.LANCZOS)
    if not caption:
        return tile
    overlay = Image.new("RGBA", tile.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    band_h = _line_height(draw, font) + 4
    draw.rectangle((0, cell - band_h, cell, cell), fill=BAND)
    text = _fit(draw, caption, font, cell - 6)
    draw.text((cell / 2, cell - band_h / 2), text, fill=(255, 255, 255, 255), font=font, anchor="mm")
    return Image.alpha_composite(tile.convert("RGBA"), overlay).convert("RGB")


def _validate(
    rows: list[list[Image.Image]],
    row_captions: list[str],
    col_captions: list[str],
    cell: int,
    cell_captions: list[list[str]] | None,
) -> None:
    if cell < 16:
        raise ValueError(f"cell must be at least 16 pixels, got {cell}")
    if not rows or not rows[0]:
        raise ValueError("make_grid needs at least one row with at least one image")
    n_cols = len(rows[0])
    for i, row in enumerate(rows):
        if len(row) != n_cols:
            raise ValueError(f"ragged rows: row {i} has {len(row)} images, row 0 has {n_cols}")
    if len(row_captions) != len(rows):
        raise ValueError(f"got {len(row_captions)} row captions for {len(rows)} rows")
    if len(col_captions) != n_cols:
        raise ValueError(f"got {len(col_captions)} column captions for {n_cols} columns")
    if cell_captions is not None and [len(r) for r in cell_captions] != [n_cols] * len(rows):
        raise ValueError(f"cell_captions must have the grid's shape: {len(rows)} rows of {n_cols} captions")


def make_grid(
    rows: list[list[Image.Image]],
    row_captions: list[str],
    col_captions: list[str],
    cell: int = 256,
    cell_captions: list[list[str]] | None = None,
) -> Image.Image:
    """Paste ``rows[i][j]`` (prompt ``i``, model ``j``) into a captioned RGB grid.

    The result is ``cell * (LABEL_WIDTH_CELLS + n_cols)`` wide and ``header_height(cell) + cell * n_rows``
    tall. ``cell_captions[i][j]`` (optional, e.g. a score) is drawn over the bottom of that cell.
    """
    _validate(rows, row_captions, col_captions, cell, cell_captions)
    n_rows, n_cols = len(rows), len(rows[0])
    top, left = header_height(cell), cell * LABEL_WIDTH_CELLS
    grid = Image.new("RGB", (left + cell * n_cols, top + cell * n_rows), BACKGROUND)
    font = _font(cell)
    header_font = ImageFont.load_default(size=min(max(10, cell // 16), top - 6))
    for j, caption in enumerate(col_captions):
        grid.paste(_header_tile(caption, cell, top, header_font), (left + j * cell, 0))
    for i, row in enumerate(rows):
        y = top + i * cell
        grid.paste(_label_tile(row_captions[i], left, cell, font), (0, y))
        for j, image in enumerate(row):
            caption = cell_captions[i][j] if cell_captions is not None else ""
            grid.paste(_image_tile(image, cell, caption, font), (left + j * cell, y))
    return grid


def paginate(n_rows: int, per_page: int) -> list[range]:
    """Consecutive row ranges of at most ``per_page`` rows covering ``range(n_rows)``."""
    if per_page < 1:
        raise ValueError(f"per_page must be >= 1, got {per_page}")
    if n_rows < 0:
        raise ValueError(f"n_rows must be >= 0, got {n_rows}")
    return [range(start, min(start + per_page, n_rows)) for start in range(0, n_rows, per_page)]
