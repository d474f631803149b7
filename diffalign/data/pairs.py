"""Offline preference pairs (prompt, winner image, loser image) for Diffusion-DPO-style training.

Four sources (``DataConfig.format``; ``auto`` picks jsonl for ``*.jsonl`` paths, webdataset for ``.tar`` shards,
folder for a folder whose subfolders hold ``prompt.txt``, pickapic otherwise):

* Preference tables: Pick-a-Pic v2's columns ``caption``, ``jpg_0``, ``jpg_1`` (image bytes, or datasets
  ``Image`` dicts) and ``label_0`` (1 = image 0 preferred, 0 = image 1 preferred, 0.5 = tie), or the binarized
  ``prompt``, ``chosen``, ``rejected`` (``data/layouts.py``). Parquet files (a file, folder, glob, or an fsspec
  URL) are read in place with pyarrow, images by row group on demand (``data/parquet.py``); a datasets hub name
  goes through ``datasets``. Only the small columns are read up front; images are decoded per item.
* Tar shards in the webdataset layout (``KEY.jpg_0``, ``KEY.jpg_1``, ``KEY.json`` with caption and label_0),
  indexed once and read by member offset (``data/tar.py``), with the same pair rules.
* JSONL: one ``{"prompt", "chosen", "rejected"}`` object per line; image paths relative to the file's folder.
* Folder: one subfolder per pair with ``prompt.txt``, ``chosen.<ext>`` and ``rejected.<ext>`` (``data/folder.py``).

Rows keep their source numbering (``row``: the parquet row, or the 0-based line index of the jsonl
file), which every error message names. ``__getitem__`` returns the winner first: ``pixels[0]`` = winner,
``pixels[1]`` = loser; ``collate_pairs`` lays a batch out as all winners then all losers.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from diffalign.config import DataConfig, field_problems
from diffalign.data import transforms as T
from diffalign.data.batches import caption_dropped, winners_then_losers
from diffalign.data.layouts import Layout, LayoutError, detect
from diffalign.data.transforms import item_rng

logger = logging.getLogger("diffalign")

JSONL_KEYS = ("prompt", "chosen", "rejected")
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


class DataError(ValueError):
    """The preference data is unusable; the message names the file, row or column at fault.

    Raised in a DataLoader worker, torch re-raises it in the main process as ``DataError("Caught DataError in
    DataLoader worker process N.\nOriginal Traceback ...")``; the constructor keeps only the original message.
    """

    def __init__(self, message: str = "") -> None:
        super().__init__(_unwrap_worker_message(str(message)))


def _unwrap_worker_message(message: str) -> str:
    head, sep, trace = message.partition("\nOriginal Traceback")
    if not (sep and head.startswith("Caught ") and " in DataLoader worker process " in head):
        return message
    last = [line for line in trace.strip().splitlines() if line.strip()][-1]
    original = last.split(": ", 1)[1] if ": " in last else last
    return f"{original} (in DataLoader worker {head.rsplit(' ', 1)[-1].rstrip('.')})"


class BadImageError(DataError):
    """One image of a pair cannot be read (corrupt bytes, missing file); names the row and the file."""


class _Source(Protocol):
    """What a source gives the dataset. Sources read in blocks (parquet row groups, tar chunks) also have
    ``blocks`` (the block of each kept pair), which ``PreferencePairs.epoch_order`` follows."""

    rows: np.ndarray  # source row of each kept pair

    def prompt(self, i: int) -> str: ...

    def images(self, i: int) -> tuple[Image.Image, Image.Image]: ...  # (winner, loser)


# ------------------------------------------------------------------------------------------ image decoding


def _decode(value: Any) -> Image.Image:
    """Bytes, a datasets ``Image`` dict ({"bytes", "path"}), a path or a PIL image -> a fully loaded image."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, (bytes, bytearray, memoryview)):
        image = Image.open(io.BytesIO(bytes(value)))
    elif isinstance(value, (str, Path)):
        with Image.open(value) as opened:
            opened.load()
            return ImageOps.exif_transpose(opened)  # a copy, so the file can close
    elif value is None:
        raise ValueError("no image (null value)")
    else:
        raise ValueError(f"unsupported image value of type {type(value).__name__}")
    image.load()
    return ImageOps.exif_transpose(image)


def _read_image(value: Any, where: str) -> Image.Image:
    try:
        return _decode(value)
    except _IMAGE_ERRORS as err:
        raise BadImageError(f"{where}: {type(err).__name__}: {err}") from err


# ----------------------------------------------------------------------------------------------- pickapic


def _looks_local(path: str) -> bool:
    return (path.startswith(("/", ".", "~")) or path.endswith((".parquet", ".jsonl"))
            or path.count("/") > 1 or "\\" in path)


def _split_files(folder: Path, split: str) -> list[Path]:
    """The split's parquet files below a local folder (rules: ``shards.choose_split``)."""
    from diffalign.data.shards import split_files

    return split_files(folder, split, ".parquet")


def table_layout(columns: Sequence[str], where: str) -> Layout:
    """The table's column layout (``layouts.detect``); a DataError naming ``where`` and the missing columns."""
    try:
        return detect(columns)
    except LayoutError as err:
        raise DataError(f"{where}: {err}") from None


def _check_shape(columns: list[str], num_rows: int, cfg: DataConfig) -> Layout:
    layout = table_layout(columns, cfg.path)
    if num_rows == 0:
        raise DataError(f"{cfg.path}: the dataset has no rows (split {cfg.split!r})")
    return layout


def _load_table(cfg: DataConfig) -> Any:
    """A ``datasets.Dataset`` for a hub name (local files and URLs go to ``data/parquet.py``)."""
    import datasets  # slow import: only when a hub dataset is used

    return _load_hub_dataset(datasets, cfg.path, cfg.split)


def _load_hub_dataset(datasets: Any, name: str, split: str) -> Any:
    try:
        return datasets.load_dataset(name, split=split)
    except Exception as err:  # noqa: BLE001 - network, auth and not-found errors all come in different types
        raise DataError(f"data.path={name}: not a local file or folder, and the datasets hub name cannot be loaded "
                        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Offline, give a "
                        "local parquet file or folder, or a .jsonl file.") from None


def labels_of(column: Any, num_rows: int, layout: Layout, where: str) -> np.ndarray:
    """The label column (a pyarrow array) as float64, null -> NaN; all 1 (image 0 wins) for a layout without
    labels."""
    import pyarrow as pa

    if layout.label is None:
        return np.ones(num_rows)
    if not (pa.types.is_floating(column.type) or pa.types.is_integer(column.type)):
        raise DataError(f"{where}: column {layout.label} has type {column.type}; expected numbers 1, 0 or 0.5")
    return column.cast(pa.float64()).to_numpy()


def _read_labels(table: Any, layout: Layout, path: str) -> np.ndarray:
    """The labels without touching the image columns."""
    column = None if layout.label is None else table.select_columns([layout.label]).with_format("arrow")[:][0]
    return labels_of(column, len(table), layout, path)


def _row(row: int) -> str:
    return f"row {row}"


def _select_pairs(labels: np.ndarray, path: str, ties: str,
                  where: Callable[[int], str] = _row) -> tuple[np.ndarray, np.ndarray, int]:
    """(kept rows, winner-is-image-0 per kept row, ties dropped). ``where(row)`` names a row in messages
    (``row N``, or with the shard for sets of several files)."""
    valid = (labels == 0) | (labels == 1) | (labels == 0.5)
    if not valid.all():
        bad = np.flatnonzero(~valid)
        value = "null" if np.isnan(labels[bad[0]]) else repr(float(labels[bad[0]]))
        raise DataError(f"{path}: {where(int(bad[0]))}: label_0 = {value} is not 1 (image 0 preferred), 0 (image 1 "
                        f"preferred) or 0.5 (tie); {bad.size} row(s) have such labels")
    tie = labels == 0.5
    n_ties = int(tie.sum())
    if n_ties and ties == "error":
        raise DataError(f"{path}: {where(int(np.flatnonzero(tie)[0]))} is a tie (label_0 = 0.5) and data.ties = "
                        f"error ({n_ties} of {labels.size} rows are ties); set data.ties=drop to skip them")
    if n_ties == labels.size:
        raise DataError(f"{path}: all {labels.size} rows are ties (label_0 = 0.5); no pairs are left after "
                        "dropping ties")
    keep = np.flatnonzero(~tie)
    return keep, labels[keep] == 1, n_ties


def choose_pairs(labels: np.ndarray, caption_null: np.ndarray, keys: np.ndarray | None, cfg: DataConfig,
                 where: Callable[[int], str] = _row,
                 prompt_column: str = "caption") -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """The Pick-a-Pic rules for a source read as arrays (parquet, tar shards): (kept rows, winner-is-image-0,
    stats). ``labels``: label_0 per source row (NaN = null); ``caption_null``: per row; ``keys``: [rows, k]
    integer codes of (caption, image uids) when the source has uid columns, else None. The same checks, order
    and messages as the datasets-table path (``_open_table``)."""
    rows, winner_is_0, n_ties = _select_pairs(labels, cfg.path, cfg.ties, where)
    rows, winner_is_0 = rows[:cfg.max_pairs], winner_is_0[:cfg.max_pairs]
    _check_null_captions(caption_null[rows], rows, cfg, where, prompt_column)
    stats = {"rows": int(labels.size), "ties_dropped": n_ties, "pairs": int(rows.size)}
    if keys is not None:
        stats["duplicates"] = _count_duplicate_codes(keys[rows], rows, cfg.path)
    return rows, winner_is_0, stats


class _Table:
    """Kept rows of a preference table (a ``datasets`` table, in either layout); images are decoded on access
    only."""

    def __init__(self, table: Any, path: str, rows: np.ndarray, winner_is_0: np.ndarray, layout: Layout) -> None:
        self.path, self.rows, self.winner_is_0, self.layout = path, rows, winner_is_0, layout
        # Arrow formatting returns raw values: bytes or {"bytes", "path"} dicts, never decoded images.
        self._captions = table.select_columns([layout.prompt]).with_format("arrow")
        self._images = table.select_columns(list(layout.images)).with_format("arrow")

    def prompt(self, i: int) -> str:
        value = self._captions[int(self.rows[i])][0][0].as_py()
        return "" if value is None else str(value)

    def images(self, i: int) -> tuple[Image.Image, Image.Image]:
        row = int(self.rows[i])
        record = self._images[row].to_pylist()[0]
        first, second = self.layout.images
        order = (first, second) if self.winner_is_0[i] else (second, first)
        winner, loser = (_read_image(record[col], f"{self.path}: row {row}: cannot read image column {col}")
                         for col in order)
        return winner, loser


def _check_captions(table: Any, rows: np.ndarray, cfg: DataConfig, column: str) -> None:
    """A null prompt is an error naming its row, unless data.null_prompt = empty."""
    if cfg.null_prompt == "empty":
        return
    values = table.select_columns([column]).with_format("arrow")[:][0]
    _check_null_captions(values.is_null().to_numpy(zero_copy_only=False)[rows], rows, cfg, column=column)


def _check_null_captions(null: np.ndarray, rows: np.ndarray, cfg: DataConfig,
                         where: Callable[[int], str] = _row, column: str = "caption") -> None:
    """``null``: per kept row; an error naming the first, unless data.null_prompt = empty."""
    nulls = np.flatnonzero(null)
    if nulls.size and cfg.null_prompt != "empty":
        raise DataError(f"{cfg.path}: {where(int(rows[nulls[0]]))}: {column} is null ({nulls.size} kept row(s) have "
                        "none); set data.null_prompt=empty to train such pairs with the empty prompt")


def _duplicate_keys(table: Any, rows: np.ndarray, layout: Layout) -> list[tuple] | None:
    """(caption, image uids) per kept row when the table has its layout's uid columns, else None."""
    if not layout.has_uids(table.column_names):
        return None
    names = (layout.prompt, *layout.uids)
    columns = table.select_columns(list(names)).with_format("arrow")[:]
    values = [columns[c].to_pylist() for c in names]
    return [(values[0][r], values[1][r], values[2][r]) for r in rows.tolist()]


def _open_table(table: Any, cfg: DataConfig) -> tuple[_Table, dict[str, int]]:
    """Pairs of a ``datasets`` table (a hub dataset)."""
    layout = _check_shape(list(table.column_names), len(table), cfg)
    rows, winner_is_0, n_ties = _select_pairs(_read_labels(table, layout, cfg.path), cfg.path, cfg.ties)
    rows, winner_is_0 = rows[:cfg.max_pairs], winner_is_0[:cfg.max_pairs]
    _check_captions(table, rows, cfg, layout.prompt)
    keys = _duplicate_keys(table, rows, layout)
    stats = {"rows": len(table), "ties_dropped": n_ties, "pairs": int(rows.size)}
    if keys is not None:              # without uid columns, finding repeats would mean reading every image
        stats["duplicates"] = _count_duplicates(keys, rows, cfg.path)
    return _Table(table, cfg.path, rows, winner_is_0, layout), stats


def _open_pickapic(cfg: DataConfig) -> tuple[_Source, dict[str, int]]:
    """Local parquet files and URLs: read with pyarrow directly (``data/parquet.py``), no conversion; a hub
    name: through ``datasets``."""
    from diffalign.data.shards import is_url

    if is_url(cfg.path) or _looks_local(cfg.path) or Path(cfg.path).expanduser().exists():
        from diffalign.data.parquet import open_parquet

        return open_parquet(cfg)
    return _open_table(_load_table(cfg), cfg)


# -------------------------------------------------------------------------------------------------- jsonl


def _parse_line(line: str, where: str, null_prompt: str = "error") -> tuple[str, str, str]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from err
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with keys {', '.join(JSONL_KEYS)}, "
                        f"got {type(record).__name__}")
    missing = [k for k in JSONL_KEYS if k not in record]
    if missing:
        raise DataError(f"{where}: missing key(s) {', '.join(missing)}; found keys: "
                        f"{', '.join(record) or '(none)'}")
    if record["prompt"] is None and null_prompt == "empty":
        record["prompt"] = ""
    for key in JSONL_KEYS:
        if record[key] is None and key == "prompt":
            raise DataError(f"{where}: `prompt` is null; set data.null_prompt=empty to train such pairs with the "
                            "empty prompt")
        if not isinstance(record[key], str):
            raise DataError(f"{where}: `{key}` must be a string, got {type(record[key]).__name__}")
    return record["prompt"], record["chosen"], record["rejected"]


def _ranked_pairs(line: str, where: str) -> list[tuple[str, str, str]] | None:
    """A ranked line, ``{"prompt", "images": [...], "ranks": [...]}`` (a lower rank is preferred), expanded to
    every pair of images with different ranks, the better one first; None for other lines."""
    record = json.loads(line)
    if not isinstance(record, dict) or "ranks" not in record:
        return None
    images, ranks, prompt = record.get("images"), record["ranks"], record.get("prompt")
    if (not isinstance(images, list) or not isinstance(ranks, list) or len(images) != len(ranks) or len(images) < 2
            or not all(isinstance(i, str) for i in images) or not isinstance(prompt, str)
            or not all(isinstance(r, (int, float)) for r in ranks)):
        raise DataError(f"{where}: a ranked line needs a string `prompt`, a list of 2 or more image paths "
                        "`images` and as many numeric `ranks` (lower = preferred)")
    order = sorted(range(len(images)), key=lambda k: ranks[k])
    return [(prompt, images[a], images[b]) for x, a in enumerate(order) for b in order[x + 1:]
            if ranks[a] < ranks[b]]


class _Jsonl:
    """Pairs listed in a jsonl file; ``rows`` are 0-based line indices (line number - 1). A ranked line (see
    :func:`_ranked_pairs`) gives several pairs: then ``rows`` number the pairs and ``lines`` keep their lines."""

    def __init__(self, path: Path, cfg: DataConfig) -> None:
        self.path = path
        rows: list[int] = []
        self.lines: list[int] = []
        self._records: list[tuple[str, str, str]] = []
        self.below_margin = self.flipped = 0
        with path.open(encoding="utf-8") as lines:
            for index, line in enumerate(lines):
                if line.strip():
                    for record in self._line_pairs(line, f"{path}, line {index + 1}", cfg):
                        self._records.append(record[:3])
                        rows.append(index if record[3] else -1)     # ranked pairs are numbered below
                        self.lines.append(index)
        if -1 in rows:                                   # ranked lines: a row per pair
            rows = list(range(len(rows)))
        max_pairs = cfg.max_pairs
        if not rows:
            raise DataError(f"{path}: no pairs (the file has no non-blank lines"
                            + (f", or none above data.min_score_margin = {cfg.min_score_margin})"
                               if cfg.min_score_margin is not None else ")"))
        self.num_rows = len(rows) + self.below_margin
        self.rows = np.asarray(rows[:max_pairs], dtype=np.int64)
        self._records = self._records[:max_pairs]

    def _line_pairs(self, line: str, where: str, cfg: DataConfig) -> list[tuple[str, str, str, bool]]:
        """The pairs of one line, each (prompt, chosen, rejected, plain): one for a plain line (none when its
        scores fall within data.min_score_margin), several for a ranked one."""
        ranked = _ranked_pairs(line, where) if '"ranks"' in line else None
        records = ranked if ranked is not None else [_parse_line(line, where, cfg.null_prompt)]
        if not cfg.outside_paths:
            for record in records:
                _check_inside(record, where)
        if ranked is not None:
            return [(*record, False) for record in ranked]
        record = records[0]
        if cfg.min_score_margin is not None:
            record = self._by_score(record, line, where, cfg.min_score_margin)
        return [] if record is None else [(*record, True)]

    def _by_score(self, record: tuple[str, str, str], line: str, where: str,
                  margin: float) -> tuple[str, str, str] | None:
        """Scored pairs: kept when |chosen_score - rejected_score| > margin, the higher-scored image as winner."""
        scores = json.loads(line)
        try:
            diff = float(scores["chosen_score"]) - float(scores["rejected_score"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{where}: data.min_score_margin is set, so every line needs numeric `chosen_score` "
                            "and `rejected_score`") from None
        if abs(diff) <= margin:
            self.below_margin += 1
            return None
        if diff < 0:
            self.flipped += 1
            return record[0], record[2], record[1]
        return record

    def prompt(self, i: int) -> str:
        return self._records[i][0]

    def images(self, i: int) -> tuple[Image.Image, Image.Image]:
        row = int(self.rows[i])
        _, chosen, rejected = self._records[i]
        where = f"{self.path}: row {row} (line {self.lines[i] + 1}): cannot read"
        folder = self.path.parent
        return (_read_image(folder / Path(chosen).expanduser(), f"{where} chosen image {chosen}"),
                _read_image(folder / Path(rejected).expanduser(), f"{where} rejected image {rejected}"))


def _check_inside(record: tuple[str, str, str], where: str) -> None:
    """Refuse image paths that leave the jsonl file's folder (lexically: symlinked folders inside it are fine)."""
    for key, value in zip(("chosen", "rejected"), record[1:], strict=True):
        path = os.path.normpath(os.path.expanduser(value))
        if os.path.isabs(path) or path == ".." or path.startswith(".." + os.sep):
            raise DataError(f"{where}: `{key}` = {value!r} points outside the jsonl file's folder; move the images "
                            "below it, or set data.outside_paths=true to allow such paths")


def _open_jsonl(cfg: DataConfig) -> tuple[_Jsonl, dict[str, int]]:
    path = Path(cfg.path).expanduser()
    if not path.is_file():
        raise DataError(f"{cfg.path}: no such jsonl file")
    source = _Jsonl(path, cfg)
    stats = {"rows": source.num_rows, "ties_dropped": 0, "pairs": int(source.rows.size),
             "duplicates": _count_duplicates(source._records, source.rows, cfg.path)}
    if cfg.min_score_margin is not None:
        stats.update(below_margin=source.below_margin, flipped_by_score=source.flipped)
        logger.info("%s: %d pairs within data.min_score_margin = %g dropped, %d oriented by their scores",
                    cfg.path, source.below_margin, cfg.min_score_margin, source.flipped)
    return source, stats


def _count_duplicates(keys: Sequence[Any], rows: np.ndarray, path: str) -> int:
    """Pairs that repeat an earlier pair exactly (same prompt and images); warned about, kept."""
    first: dict[Any, int] = {}
    repeats = []
    for key, row in zip(keys, rows.tolist(), strict=True):
        if key in first:
            repeats.append((row, first[key]))
        else:
            first[key] = row
    if repeats:
        logger.warning("%s: %d pair(s) repeat an earlier pair (first: row %d repeats row %d); they are kept and "
                       "weigh double", path, len(repeats), *repeats[0])
    return len(repeats)


def key_codes(columns: Sequence[Any]) -> np.ndarray:
    """Arrow columns of equal length -> [n, k] int64 codes (equal values get equal codes, null -> -1), so repeats
    are found with numpy instead of a dict of Python tuples (a million Pick-a-Pic rows would cost ~0.5 GB)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    codes = []
    for column in columns:
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
        indices = pc.dictionary_encode(column).indices
        codes.append(indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64))
    return np.stack(codes, axis=1) if codes else np.zeros((0, 0), np.int64)


def _count_duplicate_codes(keys: np.ndarray, rows: np.ndarray, path: str) -> int:
    """``_count_duplicates`` over integer key codes [n, k]: the same count and the same warning."""
    if keys.shape[0] == 0:
        return 0
    _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    first_of = first[inverse.reshape(-1)]
    repeats = np.flatnonzero(first_of != np.arange(keys.shape[0]))
    if repeats.size:
        logger.warning("%s: %d pair(s) repeat an earlier pair (first: row %d repeats row %d); they are kept and "
                       "weigh double", path, repeats.size, rows[repeats[0]], rows[first_of[repeats[0]]])
    return int(repeats.size)


# ------------------------------------------------------------------------------------------------ fingerprint


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def source_fingerprint(cfg: DataConfig) -> dict[str, Any]:
    """What the pairs are read from, for the cache to notice changed data: a jsonl file's content hash and its
    images' sizes and times; parquet and tar shards' sizes and times (or ETags, for URLs); a hub dataset only by
    name."""
    path = Path(cfg.path).expanduser()
    if resolve_format(cfg) == "jsonl" and path.is_file():
        text = path.read_bytes()
        images = hashlib.sha256()
        for line in text.decode("utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                record = None
            names = ([record.get("chosen", ""), record.get("rejected", ""), *record.get("images", [])]
                     if isinstance(record, dict) else [])
            for name in names:
                image = path.parent / str(name)
                if image.is_file():
                    images.update(f"{name}:{_stat(image)};".encode())
        return {"jsonl_sha256": hashlib.sha256(text).hexdigest(), "images": images.hexdigest()}
    if resolve_format(cfg) == "folder":
        return {"folder": _folder_fingerprint(path, cfg.max_pairs)}
    if path.is_file() and resolve_format(cfg) == "pickapic":
        return {"parquet": {path.name: _stat(path)}}
    if path.is_dir() and resolve_format(cfg) == "pickapic":
        return {"parquet": {f.relative_to(path).as_posix(): _stat(f) for f in _split_files(path, cfg.split)}}
    from diffalign.data.shards import find_shards, is_url

    if resolve_format(cfg) == "webdataset" or is_url(cfg.path) or _looks_local(cfg.path):
        kind, suffix = ("webdataset", ".tar") if resolve_format(cfg) == "webdataset" else ("parquet", ".parquet")
        shards = find_shards(cfg.path, cfg.split, suffix)          # globs, brace patterns, URLs
        return {kind: {name: shards.stat(k) for k, name in enumerate(shards.names)}}
    return {"hub": cfg.path}


def _folder_fingerprint(path: Path, max_pairs: int | None) -> str:
    """A hash of every pair folder's prompt and its images' names, sizes and times."""
    from diffalign.data.folder import FolderPairs

    digest = hashlib.sha256()
    for prompt, *images in FolderPairs(path, max_pairs).records:
        digest.update(prompt.encode() + b"\0")
        for image in images:
            digest.update(f"{image.relative_to(path).as_posix()}:{_stat(image)};".encode())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ dataset


def _check_config(cfg: DataConfig) -> None:
    """The same choices and ranges config loading checks, for a DataConfig built in code."""
    problems = (["data.path is empty"] if not cfg.path else []) + field_problems(cfg, "data.")
    if problems:
        raise DataError("; ".join(problems))


def resolve_format(cfg: DataConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    if cfg.path.lower().endswith(".jsonl"):
        return "jsonl"
    from diffalign.data.tar import looks_like_tar

    if looks_like_tar(cfg.path):
        return "webdataset"
    path = Path(cfg.path).expanduser()
    if path.is_dir() and any((sub / "prompt.txt").is_file() for sub in path.iterdir() if sub.is_dir()):
        return "folder"
    return "pickapic"


def _open_webdataset(cfg: DataConfig) -> tuple[Any, dict[str, int]]:
    from diffalign.data.tar import open_tar

    return open_tar(cfg)


def _open_folder(cfg: DataConfig) -> tuple[Any, dict[str, int]]:
    from diffalign.data.folder import FolderPairs

    source = FolderPairs(Path(cfg.path).expanduser(), cfg.max_pairs)
    return source, {"rows": source.num_rows, "ties_dropped": 0, "pairs": int(source.rows.size)}


class PreferencePairs(Dataset):
    """Preference pairs with deterministic per-item augmentation (see the module docstring).

    ``stats`` = {"rows": source rows, "ties_dropped": ..., "pairs": len(self)}. Call ``set_epoch`` before each
    epoch; DataLoader workers see the new epoch only if they are re-created (``persistent_workers=False``).
    """

    def __init__(self, cfg: DataConfig, seed: int = 0, caption_dropout: float | None = None) -> None:
        """``caption_dropout`` overrides ``cfg.caption_dropout`` (e.g. 0 for a cache builder)."""
        _check_config(cfg)
        self.cfg, self.seed, self.epoch = cfg, int(seed), 0
        self.caption_dropout = cfg.caption_dropout if caption_dropout is None else float(caption_dropout)
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise DataError(f"caption_dropout = {self.caption_dropout} must be in [0, 1]")
        opener = {"jsonl": _open_jsonl, "folder": _open_folder,
                  "webdataset": _open_webdataset}.get(resolve_format(cfg), _open_pickapic)
        self._source: _Source
        self._source, self.stats = opener(cfg)
        logger.info("%s: %d rows, %d ties dropped, %d pairs used", cfg.path, self.stats["rows"],
                    self.stats["ties_dropped"], self.stats["pairs"])

    def __len__(self) -> int:
        return int(self._source.rows.size)

    @staticmethod
    def collate(items: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
        """Same as ``collate_pairs``, so trainers can call ``dataset.collate`` for any dataset kind."""
        return collate_pairs(items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def epoch_order(self, seed: int, epoch: int) -> np.ndarray | None:
        """The epoch's item order for sources read in blocks (parquet row groups, tar chunks): blocks in a random
        order, items shuffled within each window of ``data.shuffle_window`` blocks (``sampler.block_window_order``),
        so a reading process's small block cache reads each block once per epoch. None (the sampler's full random
        permutation) for jsonl, folder and hub sources, and with ``data.shuffle_window = 0``."""
        blocks = getattr(self._source, "blocks", None)
        if blocks is None or self.cfg.shuffle_window == 0:
            return None
        from diffalign.data.sampler import block_window_order

        return block_window_order(blocks, self.cfg.shuffle_window, seed, epoch)

    def _index(self, i: int) -> int:
        n = len(self)
        index = int(i) + n if int(i) < 0 else int(i)
        if not 0 <= index < n:
            raise IndexError(f"pair index {i} out of range for {n} pairs")
        return index

    def row(self, i: int) -> int:
        """The source row of pair ``i`` (parquet row, or 0-based jsonl line index)."""
        return int(self._source.rows[self._index(i)])

    def prompt(self, i: int) -> str:
        """The prompt of pair ``i``, without caption dropout."""
        return self._source.prompt(self._index(i))

    def _draws(self, i: int) -> tuple[bool, tuple[T.Augment, T.Augment]]:
        rng = item_rng(self.seed, self.epoch, self.row(i))
        dropped = caption_dropped(rng, self.caption_dropout)     # always the first draw
        return dropped, T.draw_pair_augments(rng, self.cfg.crop, self.cfg.hflip, self.cfg.paired_transforms)

    def caption_dropped(self, i: int) -> bool:
        """Whether pair ``i`` gets the empty prompt this epoch (the same decision ``__getitem__`` makes)."""
        return self._draws(i)[0]

    def pair_images(self, i: int) -> tuple[Image.Image, Image.Image] | None:
        """Decoded (winner, loser) before any transform; None when unreadable and on_bad_image=skip_pair."""
        try:
            return self._source.images(self._index(i))
        except BadImageError as err:
            if self.cfg.on_bad_image == "error":
                raise
            logger.warning("%s; skipping the whole pair (index %d)", err, self._index(i))
            return None

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        index = self._index(i)
        images = self.pair_images(index)
        if images is None:
            return None
        dropped, augs = self._draws(index)
        size = self.cfg.resolution
        out = [T.transform_image(image, size, aug) for image, aug in zip(images, augs, strict=True)]
        return {
            "prompt": "" if dropped else self._source.prompt(index),
            "pixels": torch.stack([o.pixels for o in out]),
            "original_sizes": torch.tensor([o.original_size for o in out], dtype=torch.long),
            "crops": torch.tensor([o.crop for o in out], dtype=torch.long),
            "index": index,
            "row": self.row(index),
        }


def collate_pairs(items: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """Batch pairs; None items (unreadable pairs) are dropped and counted in ``num_skipped``.

    When every item was dropped the batch is empty (``prompts == []``, tensors with a leading 0).
    """
    kept = [item for item in items if item is not None]
    batch: dict[str, Any] = {
        "prompts": [item["prompt"] for item in kept],
        "indices": torch.tensor([item["index"] for item in kept], dtype=torch.long),
        "rows": torch.tensor([item["row"] for item in kept], dtype=torch.long),
        "num_skipped": len(items) - len(kept),
    }
    if not kept:
        empty = torch.zeros(0, 2, dtype=torch.long)
        return {**batch, "pixels": torch.zeros(0, 3, 0, 0), "original_sizes": empty, "crops": empty.clone()}
    for key in ("pixels", "original_sizes", "crops"):
        batch[key] = winners_then_losers([item[key] for item in kept])
    return batch

