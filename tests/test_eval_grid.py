"""Labelled image grids (diffalign.eval.grid)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffalign.eval.grid import LABEL_WIDTH_CELLS, header_height, make_grid, paginate

LONG_PROMPT = (
    "a photograph of an astronaut riding a horse on the surface of the moon, dramatic lighting, highly detailed, "
    "8k, trending on artstation, by a famous painter whose name is far too long to fit in a single grid cell"
)


def _colour(i: int, j: int) -> tuple[int, int, int]:
    """A distinct mid-tone colour per cell, far from both white and the dark text colour."""
    return (60 + 40 * i, 200 - 30 * j, 90 + 20 * (i + j))


def _rows(n_rows: int, n_cols: int, size: tuple[int, int] = (40, 30)) -> list[list[Image.Image]]:
    return [[Image.new("RGB", size, _colour(i, j)) for j in range(n_cols)] for i in range(n_rows)]


def _dark_pixels(region: np.ndarray) -> int:
    return int((region.max(axis=-1) < 128).sum())


def test_header_height():
    assert header_height(16) == 24
    assert header_height(64) == 24
    assert header_height(150) == 25
    assert header_height(256) == 42


@pytest.mark.parametrize(
    ("n_rows", "n_cols", "cell", "size"),
    [
        (3, 2, 64, (192, 216)),  # width 64 * (1 + 2); height 24 + 3 * 64
        (1, 1, 16, (32, 40)),  # width 16 * (1 + 1); height 24 + 16
        (5, 3, 150, (600, 775)),  # width 150 * (1 + 3); height 25 + 5 * 150
        (2, 4, 256, (1280, 554)),  # width 256 * (1 + 4); height 42 + 2 * 256
    ],
)
def test_grid_size(n_rows, n_cols, cell, size):
    grid = make_grid(_rows(n_rows, n_cols), [f"p{i}" for i in range(n_rows)], [f"m{j}" for j in range(n_cols)], cell)
    assert grid.mode == "RGB"
    assert grid.size == size
    assert LABEL_WIDTH_CELLS == 1


@pytest.mark.parametrize("with_cell_captions", [False, True])
def test_cells_hold_their_images(with_cell_captions):
    cell, n_rows, n_cols = 64, 3, 2
    captions = [[f"score {i}.{j}" for j in range(n_cols)] for i in range(n_rows)] if with_cell_captions else None
    grid = make_grid(_rows(n_rows, n_cols), ["a", "b", "c"], ["base", "tuned"], cell, cell_captions=captions)
    for i in range(n_rows):
        for j in range(n_cols):
            centre = (cell * (1 + j) + cell // 2, 24 + cell * i + cell // 2)
            assert grid.getpixel(centre) == _colour(i, j)


def test_inputs_of_any_mode_and_size_are_resized_to_rgb_cells():
    images = [
        Image.new("RGBA", (300, 100), (10, 120, 200, 255)),
        Image.new("L", (17, 33), 150),
        Image.new("RGB", (512, 512), (200, 60, 30)),
    ]
    grid = make_grid([images], ["prompt"], ["a", "b", "c"], cell=32)
    assert grid.mode == "RGB" and grid.size == (128, 56)
    arr = np.asarray(grid)
    assert (arr[24:56, 32:64] == (10, 120, 200)).all()
    assert (arr[24:56, 64:96] == (150, 150, 150)).all()
    assert (arr[24:56, 96:128] == (200, 60, 30)).all()


def test_captions_draw_text_in_label_column_and_header():
    cell = 96
    top = header_height(cell)
    rows = _rows(2, 2)
    blank = np.asarray(make_grid(rows, ["", ""], ["", ""], cell))
    labelled = np.asarray(make_grid(rows, ["a red cube", "a blue sphere"], ["base", "run/final"], cell))
    label_column = (slice(top, None), slice(0, cell))
    header = (slice(0, top), slice(cell, None))
    assert _dark_pixels(blank[label_column]) == 0 and _dark_pixels(blank[header]) == 0
    assert _dark_pixels(labelled[label_column]) > 20
    assert _dark_pixels(labelled[header]) > 20
    # each column caption sits above its own column
    assert _dark_pixels(labelled[0:top, cell : 2 * cell]) > 0
    assert _dark_pixels(labelled[0:top, 2 * cell : 3 * cell]) > 0


def test_long_captions_stay_in_their_area():
    cell = 64
    rows = _rows(2, 2)
    grid = np.asarray(make_grid(rows, [LONG_PROMPT, "x" * 500], ["base " * 20, "tuned " * 20], cell))
    for i in range(2):
        for j in range(2):
            block = grid[24 + cell * i : 24 + cell * (i + 1), cell * (1 + j) : cell * (2 + j)]
            assert (block == _colour(i, j)).all(), f"text spilled into cell ({i}, {j})"
    # the top-left corner (above the label column) stays blank
    assert (grid[:24, :cell] == 255).all()
    # the long prompt was drawn (and cut) inside its own label cell
    assert _dark_pixels(grid[24 : 24 + cell, :cell]) > 50


def test_cell_caption_band_darkens_the_bottom_of_the_cell():
    cell = 64
    grid = make_grid(_rows(1, 2), ["p"], ["a", "b"], cell, cell_captions=[["pickscore 21.30", ""]])
    bottom_left_of_cell = (cell + 1, 24 + cell - 2)
    captioned = grid.getpixel(bottom_left_of_cell)
    assert all(c < o for c, o in zip(captioned, _colour(0, 0), strict=True))
    assert grid.getpixel((2 * cell + 1, 24 + cell - 2)) == _colour(0, 1)  # empty caption: no band


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (([], [], []), {}, "at least one row"),
        (([[]], ["p"], []), {}, "at least one row"),
        ((_rows(1, 2) + _rows(1, 3), ["p", "q"], ["a", "b"]), {}, "ragged rows: row 1 has 3"),
        ((_rows(2, 2), ["p"], ["a", "b"]), {}, "1 row captions for 2 rows"),
        ((_rows(2, 2), ["p", "q"], ["a"]), {}, "1 column captions for 2 columns"),
        ((_rows(2, 2), ["p", "q"], ["a", "b"]), {"cell_captions": [["x", "y"]]}, "cell_captions"),
        ((_rows(2, 2), ["p", "q"], ["a", "b"]), {"cell_captions": [["x", "y"], ["z"]]}, "cell_captions"),
        ((_rows(1, 1), ["p"], ["a"]), {"cell": 15}, "at least 16"),
    ],
)
def test_make_grid_errors(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_grid(*args, **kwargs)


def test_paginate():
    assert paginate(10, 4) == [range(0, 4), range(4, 8), range(8, 10)]
    assert paginate(8, 4) == [range(0, 4), range(4, 8)]
    assert paginate(3, 5) == [range(0, 3)]
    assert paginate(1, 1) == [range(0, 1)]
    assert paginate(0, 3) == []
    with pytest.raises(ValueError, match="per_page"):
        paginate(5, 0)
    with pytest.raises(ValueError, match="n_rows"):
        paginate(-1, 2)
