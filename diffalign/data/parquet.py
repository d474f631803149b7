"""Preference parquet (Pick-a-Pic's columns, or prompt/chosen/rejected) read with pyarrow directly: no ``datasets``
conversion, bounded memory.

``datasets.load_dataset("parquet", ...)`` converts every shard into an Arrow cache under ``~/.cache/huggingface``
first, which for Pick-a-Pic v2 (335 GB) copies the whole set to disk again. Here the files are read in place
(local, or through fsspec for a URL, so a set larger than one disk never needs a local copy):

* on open, the footers (row groups and their row counts) and the small columns (``label_0`` and ``caption``,
  and the image uids, for duplicate counting; ``prompt`` alone in the binarized layout) of every file; the
  column layout is the first non-empty file's (``data/layouts.py``), and the pair rules and messages are those
  of every Pick-a-Pic-schema source (``pairs.choose_pairs``);
* per item, the row group holding it, only the two image columns, kept in a per-process LRU of
  ``max(data.shuffle_window, 1)`` row groups. Memory is therefore bounded by that many row groups' image bytes
  per reading process (each DataLoader worker, or the main process with ``num_workers=0``), whatever the set's
  size: the pairs' bytes are never all in memory, only the small columns are.

A parquet file cannot hand out one row: the smallest unit read is a row group's column chunk (``datasets``
writes image sets with ~100-row groups). So the items are grouped by row group (``blocks``) and the training
order visits a few row groups at a time (``sampler.block_window_order``); a full random permutation
(``data.shuffle_window=0``) costs a row-group read per pair.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from diffalign.config import DataConfig
from diffalign.data.layouts import IMAGE_COLUMNS, Layout
from diffalign.data.pairs import BadImageError, DataError, _read_image, choose_pairs, key_codes, labels_of, table_layout
from diffalign.data.shards import ShardHandles, ShardSet, find_shards

logger = logging.getLogger("diffalign")


class BlockCache:
    """The last ``capacity`` blocks read (least recently used dropped first), per process.

    ``peak`` is the most blocks it has held at once, ``loads`` how many reads it made: what the memory-bound
    test checks. A copy made by pickling (a spawned worker) or inherited through fork starts empty.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, int(capacity))
        self._held: OrderedDict[Hashable, Any] = OrderedDict()
        self.peak = self.loads = 0

    def get(self, key: Hashable, load: Callable[[], Any]) -> Any:
        if key in self._held:
            self._held.move_to_end(key)
            return self._held[key]
        while len(self._held) >= self.capacity:      # drop before loading: never capacity + 1 at once
            self._held.popitem(last=False)
        value = self._held[key] = load()
        self.loads += 1
        self.peak = max(self.peak, len(self._held))
        return value

    def __len__(self) -> int:
        return len(self._held)

    def __getstate__(self) -> dict[str, Any]:
        return {"capacity": self.capacity}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["capacity"])


class _ParquetHandle:
    """An open ``pq.ParquetFile`` and the file object under it (fsspec files are ours to close)."""

    def __init__(self, shards: ShardSet, k: int) -> None:
        import pyarrow.parquet as pq

        self.file = None if shards.fs is None else shards.open(k)
        # local: pyarrow's own reader (positional reads); remote: coalesce the column chunks into few requests
        self.parquet = pq.ParquetFile(shards.files[k] if self.file is None else self.file,
                                      pre_buffer=self.file is not None)

    def close(self) -> None:
        self.parquet.close()
        if self.file is not None:
            self.file.close()


class _Footers:
    """What the files' footers say: the files with rows, their row-group row counts and column names, the first
    file's column names (for an error when every file is empty), and each row group's bytes (uncompressed, as
    held in memory) per image column of any layout."""

    def __init__(self, shards: ShardSet) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.files: list[int] = []
        self.groups: list[list[int]] = []
        self.columns: list[list[str]] = []
        self.first_columns: list[str] | None = None
        self.image_bytes: list[dict[str, int]] = []     # per row group, across the files
        for k in range(len(shards.files)):
            try:
                with shards.open(k) as f:
                    meta = pq.ParquetFile(f).metadata
            except (OSError, pa.ArrowException) as err:
                raise DataError(f"{shards.display(k)}: not a readable parquet file: {err}") from err
            names = meta.schema.to_arrow_schema().names
            self.first_columns = names if self.first_columns is None else self.first_columns
            if not meta.num_rows:
                continue
            self.files.append(k)
            self.groups.append([meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
            self.columns.append(names)
            leaves = [(c, top) for c in range(meta.num_columns)
                      if (top := meta.schema.column(c).path.split(".")[0]) in IMAGE_COLUMNS]
            for g in range(meta.num_row_groups):
                group, sizes = meta.row_group(g), {}
                for c, top in leaves:
                    sizes[top] = sizes.get(top, 0) + group.column(c).total_uncompressed_size
                self.image_bytes.append(sizes)

    def group_bytes(self, layout: Layout) -> int:
        """The largest row group's bytes of the layout's two image columns."""
        return max((sum(sizes.get(c, 0) for c in layout.images) for sizes in self.image_bytes), default=0)


class ParquetPairs:
    """Kept rows of a set of preference parquet files; images read by row group, on access only.

    ``rows``: the source row of each kept pair (rows numbered across the files in order, as ``datasets`` would);
    ``blocks``: the row group (numbered across the files) of each kept pair.
    """

    def __init__(self, shards: ShardSet, cfg: DataConfig) -> None:
        self.shards, self.path = shards, cfg.path
        footers = _Footers(shards)
        self.layout = self._check_columns(footers, cfg)
        files = self.files = footers.files                    # shard index of each file with rows
        counts = [np.asarray(g, dtype=np.int64) for g in footers.groups]
        self.group_file = np.concatenate([np.full(c.size, j, np.int64) for j, c in enumerate(counts)])
        self.group_index = np.concatenate([np.arange(c.size, dtype=np.int64) for c in counts])
        sizes = np.concatenate(counts)
        self.group_start = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.file_start = self.group_start[np.searchsorted(self.group_file, np.arange(len(files)))]
        uids = all(self.layout.has_uids(names) for names in footers.columns)
        labels, captions, keys = self._small_columns(files, cfg, uids)
        self.rows, self.winner_is_0, self.stats = choose_pairs(
            labels, captions.is_null().to_numpy(zero_copy_only=False), keys, cfg, self.where, self.layout.prompt)
        self.blocks = np.searchsorted(self.group_start, self.rows, side="right") - 1
        self._captions = captions.take(self.rows).combine_chunks()
        capacity = max(cfg.shuffle_window, 1)
        self._cache = BlockCache(capacity)
        self._handles = ShardHandles(self._open_file, capacity)
        self.group_bytes = footers.group_bytes(self.layout)
        logger.info("%s: %d parquet file(s), %d row groups, the largest with %.1f MB of images; each reading "
                    "process holds at most %d row groups (data.shuffle_window), <= %.0f MB", cfg.path, len(files),
                    sizes.size, self.group_bytes / 2**20, capacity, capacity * self.group_bytes / 2**20)

    # ---------------------------------------------------------------------------------------------- open
    def _check_columns(self, footers: _Footers, cfg: DataConfig) -> Layout:
        """The layout (the messages of ``pairs._check_shape``); with several files it is the first non-empty
        file's, and a file missing one of its columns is named."""
        from diffalign.data.pairs import _check_shape

        if not footers.files or len(self.shards.files) == 1:
            return _check_shape(footers.columns[0] if footers.files else footers.first_columns or [],
                                sum(map(sum, footers.groups)), cfg)
        layout = table_layout(footers.columns[0], self.shards.display(footers.files[0]))
        for k, names in zip(footers.files, footers.columns, strict=True):
            missing = layout.missing(names)
            if missing:
                raise DataError(f"{self.shards.display(k)}: missing column(s) {', '.join(missing)}; found columns: "
                                f"{', '.join(names) or '(none)'} (the set has the {layout.name} layout of "
                                f"{self.shards.names[footers.files[0]]})")
        return layout

    def _small_columns(self, files: list[int], cfg: DataConfig, uids: bool) -> tuple[np.ndarray, Any, Any]:
        """(the label as float64 per row, null -> NaN, 1 without a label column; prompts as one large_string
        chunked array; key codes of (prompt, image uids) per row, or None without uid columns)."""
        import pyarrow as pa

        layout = self.layout
        uid_names = layout.uids if uids else ()    # uids: every file has the layout's uid columns
        wanted = [*((layout.label,) if layout.label else ()), layout.prompt, *uid_names]
        labels, captions, uid_columns = [], [], [[] for _ in uid_names]
        for k in files:
            handle = _ParquetHandle(self.shards, k)
            try:
                table = handle.parquet.read(columns=wanted, use_threads=False)
            except (OSError, pa.ArrowException) as err:
                raise DataError(f"{self.shards.display(k)}: cannot read columns {', '.join(wanted)}: {err}") from err
            finally:
                handle.close()
            where = cfg.path if len(self.shards.files) == 1 else self.shards.display(k)
            labels.append(labels_of(table.column(layout.label) if layout.label else None, table.num_rows, layout,
                                    where))
            captions.extend(self._as_text(table.column(layout.prompt), layout.prompt, k).chunks)
            for column, name in zip(uid_columns, uid_names, strict=True):
                column.extend(self._as_text(table.column(name), name, k).chunks)
            del table
        caption = pa.chunked_array(captions, pa.large_string())
        keys = (key_codes([caption, *(pa.chunked_array(c, pa.large_string()) for c in uid_columns)])
                if uid_names else None)
        return np.concatenate(labels), caption, keys

    def _as_text(self, column: Any, name: str, k: int) -> Any:
        import pyarrow as pa

        try:
            return column.cast(pa.large_string())
        except (pa.ArrowException, ValueError) as err:
            raise DataError(f"{self.shards.display(k)}: column {name} has type {column.type}, not text: "
                            f"{err}") from None

    # ---------------------------------------------------------------------------------------------- items
    def where(self, row: int) -> str:
        """``row N``, and for several files the file and its own row: messages a person can act on."""
        if len(self.shards.files) == 1:
            return f"row {row}"
        j = int(np.searchsorted(self.file_start, row, side="right") - 1)
        return f"row {row} ({self.shards.names[self.files[j]]}, row {row - int(self.file_start[j])})"

    def _open_file(self, j: int) -> _ParquetHandle:
        return _ParquetHandle(self.shards, self.files[j])

    def _read_group(self, g: int, row: int) -> Any:
        import pyarrow as pa

        _worker_memory_pool()
        j = int(self.group_file[g])
        try:
            handle = self._handles.get(j)
            return handle.parquet.read_row_group(int(self.group_index[g]), columns=list(self.layout.images),
                                                 use_threads=False)
        except (OSError, pa.ArrowException) as err:
            raise BadImageError(f"{self.path}: {self.where(row)}: cannot read row group {self.group_index[g]} of "
                                f"{self.shards.display(self.files[j])}: {type(err).__name__}: {err}") from err

    def group(self, g: int, row: int = -1) -> Any:
        """Row group ``g``'s image columns (a pyarrow table), through the cache."""
        return self._cache.get(g, lambda: self._read_group(g, row))

    def prompt(self, i: int) -> str:
        value = self._captions[i].as_py()
        return "" if value is None else str(value)

    def images(self, i: int) -> tuple[Image.Image, Image.Image]:
        row, g = int(self.rows[i]), int(self.blocks[i])
        table = self.group(g, row)
        offset = row - int(self.group_start[g])
        first, second = self.layout.images
        order = (first, second) if self.winner_is_0[i] else (second, first)
        winner, loser = (_read_image(table.column(col)[offset].as_py(),
                                     f"{self.path}: {self.where(row)}: cannot read image column {col}")
                         for col in order)
        return winner, loser


_POOL_SET_IN: int | None = None


def _worker_memory_pool() -> None:
    """In a DataLoader worker (a process that only reads data), make jemalloc Arrow's pool when it is built in.

    pyarrow's default pool (mimalloc in current wheels) keeps freed row-group buffers: reading 37 MB row groups
    through a 16-group cache, a process's heap grew 0.8 GB for 0.57 GB held, with jemalloc 0.55 GB (the system
    allocator: 1.2 GB). Workers only, since the pool is process-wide; with data.num_workers = 0, set
    ARROW_DEFAULT_MEMORY_POOL=jemalloc for the same effect."""
    global _POOL_SET_IN
    if _POOL_SET_IN == os.getpid():
        return
    _POOL_SET_IN = os.getpid()
    import pyarrow as pa
    from torch.utils.data import get_worker_info

    if get_worker_info() is not None:
        try:
            pa.set_memory_pool(pa.jemalloc_memory_pool())
        except NotImplementedError:                       # a pyarrow build without jemalloc (Windows)
            pass


def open_parquet(cfg: DataConfig) -> tuple[ParquetPairs, dict[str, int]]:
    """The parquet file, folder (the split's files), glob or URL ``cfg.path`` names."""
    local = Path(cfg.path).expanduser()
    if local.is_file() and local.suffix != ".parquet":
        raise DataError(f"{cfg.path}: expected a .parquet file, a folder of parquet files, a datasets hub "
                        "name or a .jsonl file")
    shards = find_shards(cfg.path, cfg.split, ".parquet")
    if len(shards.files) > 1 or local.is_dir():
        logger.info("%s: reading %d parquet file(s) for split %r", cfg.path, len(shards.files), cfg.split)
    source = ParquetPairs(shards, cfg)
    return source, source.stats
