"""Pick-a-Pic pairs from tar shards in the webdataset layout, read map-style by member offset.

A sample is the members of a shard that share a key (webdataset's rule: the member name up to the first dot of
its last part): ``KEY.jpg_0`` and ``KEY.jpg_1`` (or another image format: ``KEY.png_0``, ``KEY.webp_1``, ...) and
``KEY.json`` holding Pick-a-Pic's ``caption`` and ``label_0`` (and optionally ``image_0_uid`` / ``image_1_uid``,
which enable duplicate counting as for parquet). Other members are ignored.

Opening a set reads every shard's headers once (std-lib ``tarfile``; headers only, it seeks past the image
data) and the small json members, so the pairs follow the same rules and messages as parquet
(``pairs.choose_pairs``: ties, null captions, labels, duplicates). Each shard's index is kept in the index cache
(``$DIFFALIGN_CACHE/tar_index``, else ``~/.cache/diffalign/tar_index``) under the shard's path, size and
modification time (a URL's ETag), so a later run reads one small file per shard instead of every header; a
changed shard is indexed again. An image is then read on demand with one
positional read of its member's bytes: memory holds one pair at a time, whatever the shard sizes. Rows are
numbered across the shards in order; messages name the shard and the key.

The ``webdataset`` package is not used: its loaders iterate (no index, so no exact resume or per-example seeds
without replaying), and its indexed ``wids`` datasets want a shard-list json and copy remote shards to a local
cache; a header index over plain ``tarfile`` keeps the map-style design with no new dependency.

For the epoch order, the blocks are chunks of ``BLOCK_SAMPLES`` consecutive samples of a shard (a block never
spans two shards), so a window of blocks reads a few short runs of each shard. Shards must be uncompressed
(a ``.tar.gz`` has no random access). Indexing reads every header, which for a URL means fetching the shards
once; for remote sets prefer parquet (its footers index the set in a few requests per file).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from diffalign.config import DataConfig
from diffalign.data.folder import IMAGE_SUFFIXES
from diffalign.data.pairs import BadImageError, DataError, _read_image, choose_pairs, key_codes
from diffalign.data.shards import ShardHandles, ShardSet, find_shards

logger = logging.getLogger("diffalign")

BLOCK_SAMPLES = 100
_MEMBER = re.compile(r"^((?:.*/|)[^./][^.]*)\.([^/]*)$")       # (key, extension), as webdataset splits names
_IMAGE = re.compile(r"^(?P<fmt>[a-z0-9]+)_(?P<side>[01])$")
IMAGE_FORMATS = {s.lstrip(".") for s in IMAGE_SUFFIXES}
UID_KEYS = ("image_0_uid", "image_1_uid")


INDEX_VERSION = 1


def index_cache_dir() -> Path:
    """Where shard indexes are kept: ``$DIFFALIGN_CACHE/tar_index``, else ``$XDG_CACHE_HOME`` (or ``~/.cache``)
    ``/diffalign/tar_index``."""
    root = os.environ.get("DIFFALIGN_CACHE") or (
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "diffalign")
    return Path(root) / "tar_index"


class _ShardIndex:
    """One shard's samples in order: key, the two image members (offset, size, extension; None = absent) and
    the json fields the pairs need (label_0, caption, the image uids when present), from the headers and the json
    members. Only those fields are kept, not the parsed records, so opening a million samples stays small."""

    FIELDS = ("keys", "images", "labels", "captions", "uids", "all_uids")

    @classmethod
    def load(cls, shards: ShardSet, k: int) -> _ShardIndex:
        """The cached index when it was built from this very shard (path, size, stamp); else built from the
        headers and cached. A shard that fails to index raises as before and caches nothing."""
        stamp = {"version": INDEX_VERSION, "shard": shards.display(k), "stat": shards.stat(k)}
        path = index_cache_dir() / f"{hashlib.sha1(json.dumps(stamp).encode()).hexdigest()}.json"
        try:
            saved = json.loads(path.read_text())
            if saved.get("stamp") == stamp:
                index = cls.__new__(cls)
                index.name, index.cached = shards.display(k), True
                for field in cls.FIELDS:
                    setattr(index, field, saved[field])
                return index
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as err:
            logger.warning("%s: its cached index %s is unreadable (%s); indexing the shard again",
                           shards.display(k), path, err)
        index, tmp = cls(shards, k), None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
                tmp = f.name
                json.dump({"stamp": stamp, **{field: getattr(index, field) for field in cls.FIELDS}}, f)
            os.replace(tmp, path)                       # whole or absent: a killed run leaves no half index
        except OSError as err:
            logger.warning("could not cache the index of %s in %s (%s); it is indexed again next time",
                           shards.display(k), path.parent, err)
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
        return index

    def __init__(self, shards: ShardSet, k: int) -> None:
        self.name, self.cached = shards.display(k), False
        self.keys: list[str] = []
        self.images: list[list[tuple[int, int, str] | None]] = []
        self.labels: list[float] = []
        self.captions: list[str | None] = []
        self.uids: list[tuple[str | None, str | None]] = []
        self.all_uids = True
        members: dict[str, dict[str, Any]] = {}
        with shards.open(k) as f:
            try:
                archive = tarfile.open(fileobj=f, mode="r:")
            except tarfile.TarError as err:
                raise DataError(f"{self.name}: not an uncompressed tar file ({err}); tar shards are read by member "
                                "offset, so they cannot be compressed") from None
            for member in archive:
                self._add(member, members, f)
            archive.members.clear()
        for key, found in members.items():
            self._sample(key, found)

    def _add(self, member: tarfile.TarInfo, members: dict[str, dict[str, Any]], f: Any) -> None:
        match = _MEMBER.match(member.name) if member.isfile() else None
        if match is None:
            return
        key, ext = match.group(1), match.group(2)
        image = _IMAGE.match(ext.lower())
        if ext.lower() == "json":
            f.seek(member.offset_data)
            value: Any = f.read(member.size)
            slot = "json"
        elif image and image["fmt"] in IMAGE_FORMATS:
            value, slot = (member.offset_data, member.size, ext), f"image_{image['side']}"
        else:
            members.setdefault(key, {}).setdefault("other", []).append(ext)
            return
        found = members.setdefault(key, {})
        if slot in found:
            other = found[slot][2] if slot != "json" else "json"
            raise DataError(f"{self.name}: key {key}: two members for the same part ({key}.{other} and "
                            f"{key}.{ext}); each sample has one json and one image per side")
        found[slot] = value

    def _sample(self, key: str, found: dict[str, Any]) -> None:
        if "json" not in found and "image_0" not in found and "image_1" not in found:
            return                                            # unrelated members (a README, ...)
        parts = [found[s][2] for s in ("image_0", "image_1") if s in found] + found.get("other", [])
        if "json" not in found:
            raise DataError(f"{self.name}: key {key}: no {key}.json (found {', '.join(parts)}); every sample needs "
                            "a json member with caption and label_0")
        record = self._record(key, found["json"])
        self.keys.append(key)
        self.images.append([found.get("image_0"), found.get("image_1")])
        self.labels.append(np.nan if record["label_0"] is None else float(record["label_0"]))
        self.captions.append(record["caption"])
        self.all_uids = self.all_uids and all(u in record for u in UID_KEYS)
        self.uids.append(tuple(_text(record.get(u)) for u in UID_KEYS) if self.all_uids else (None, None))

    def _record(self, key: str, data: bytes) -> dict[str, Any]:
        where = f"{self.name}: key {key}: {key}.json"
        try:
            record = json.loads(data)
        except (ValueError, UnicodeDecodeError) as err:
            raise DataError(f"{where} is not valid JSON ({err})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected an object with caption and label_0, got {type(record).__name__}")
        missing = [c for c in ("caption", "label_0") if c not in record]
        if missing:
            raise DataError(f"{where}: missing key(s) {', '.join(missing)}; found keys: "
                            f"{', '.join(record) or '(none)'}")
        label = record["label_0"]
        if label is not None and (isinstance(label, bool) or not isinstance(label, (int, float))):
            raise DataError(f"{where}: label_0 = {label!r}; expected numbers 1, 0 or 0.5")
        if record["caption"] is not None and not isinstance(record["caption"], str):
            raise DataError(f"{where}: caption must be a string or null, got {type(record['caption']).__name__}")
        return record


class TarPairs:
    """Kept samples of a set of tar shards; images read by member offset, on access only.

    ``rows``: the source row (sample number across the shards) of each kept pair; ``blocks``: its chunk of
    ``BLOCK_SAMPLES`` samples of one shard.
    """

    def __init__(self, shards: ShardSet, cfg: DataConfig) -> None:
        import pyarrow as pa

        self.shards, self.path = shards, cfg.path
        started = time.perf_counter()
        indexes = [_ShardIndex.load(shards, k) for k in range(len(shards.files))]
        counts = np.asarray([len(ix.keys) for ix in indexes], dtype=np.int64)
        if not counts.sum():
            raise DataError(f"{cfg.path}: the dataset has no rows (no samples with a json member in "
                            f"{len(shards.files)} tar shard(s))")
        self.shard_of = np.repeat(np.arange(len(indexes)), counts)
        self.shard_start = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        labels = np.asarray([x for ix in indexes for x in ix.labels], dtype=np.float64)
        captions = pa.array([c for ix in indexes for c in ix.captions], pa.large_string())
        self._keys = pa.array([key for ix in indexes for key in ix.keys], pa.large_string())
        self.offsets, self.sizes, self._exts, self._ext_names = self._members(indexes)
        keys = None
        if all(ix.all_uids for ix in indexes):
            keys = key_codes([captions, *(pa.array([u[side] for ix in indexes for u in ix.uids], pa.large_string())
                                          for side in (0, 1))])
        cached = sum(ix.cached for ix in indexes)
        del indexes
        self.rows, self.winner_is_0, self.stats = choose_pairs(
            labels, captions.is_null().to_numpy(zero_copy_only=False), keys, cfg, self.where)
        self._captions = captions.take(self.rows)
        within = self.rows - self.shard_start[self.shard_of[self.rows]]
        first_block = np.concatenate([[0], np.cumsum(np.ceil(counts / BLOCK_SAMPLES).astype(np.int64))[:-1]])
        self.blocks = first_block[self.shard_of[self.rows]] + within // BLOCK_SAMPLES
        self._handles = ShardHandles(self._open, max(cfg.shuffle_window, 1))
        logger.info("%s: indexed %d tar shard(s) (%d from the index cache), %d samples in %.1f s", cfg.path,
                    len(shards.files), cached, int(counts.sum()), time.perf_counter() - started)

    @staticmethod
    def _members(indexes: list[_ShardIndex]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
        """[rows, 2] offsets and sizes of the two images (-1 = no such member) and extension codes."""
        images = [pair for ix in indexes for pair in ix.images]
        names = sorted({m[2] for pair in images for m in pair if m is not None})
        code = {name: c for c, name in enumerate(names)}
        offsets = np.full((len(images), 2), -1, dtype=np.int64)
        sizes = np.zeros((len(images), 2), dtype=np.int64)
        exts = np.zeros((len(images), 2), dtype=np.int16)
        for r, pair in enumerate(images):
            for side, member in enumerate(pair):
                if member is not None:
                    offsets[r, side], sizes[r, side], exts[r, side] = member[0], member[1], code[member[2]]
        return offsets, sizes, exts, names

    def where(self, row: int) -> str:
        shard = int(self.shard_of[row])
        return f"row {row} ({self.shards.names[shard]}, key {self._keys[row].as_py()})"

    def _open(self, k: int) -> Any:
        return _LocalFile(self.shards.files[k]) if self.shards.fs is None else self.shards.open(k)

    def _read(self, row: int, side: int) -> Image.Image:
        key = self._keys[row].as_py()
        if self.offsets[row, side] < 0:
            raise BadImageError(f"{self.path}: {self.where(row)}: cannot read image {side}: the sample has no "
                                f"{key}.<image>_{side} member")
        name = f"{key}.{self._ext_names[self._exts[row, side]]}"
        offset, size = int(self.offsets[row, side]), int(self.sizes[row, side])
        try:
            data = _read_at(self._handles.get(int(self.shard_of[row])), offset, size)
        except OSError as err:
            raise BadImageError(f"{self.path}: {self.where(row)}: cannot read {name}: {type(err).__name__}: "
                                f"{err}") from err
        if len(data) != size:
            raise BadImageError(f"{self.path}: {self.where(row)}: cannot read {name}: the shard ends after "
                                f"{len(data)} of its {size} bytes")
        return _read_image(data, f"{self.path}: {self.where(row)}: cannot read {name}")

    def prompt(self, i: int) -> str:
        value = self._captions[i].as_py()
        return "" if value is None else value

    def images(self, i: int) -> tuple[Image.Image, Image.Image]:
        row = int(self.rows[i])
        order = (0, 1) if self.winner_is_0[i] else (1, 0)
        winner, loser = (self._read(row, side) for side in order)
        return winner, loser


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


class _LocalFile:
    """A raw descriptor read with ``os.pread``: no shared file offset, no read-ahead buffer to fill."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDONLY)

    def close(self) -> None:
        os.close(self.fd)


def _read_at(handle: Any, offset: int, size: int) -> bytes:
    if isinstance(handle, _LocalFile):
        return os.pread(handle.fd, size, offset)
    handle.seek(offset)
    return handle.read(size)


def open_tar(cfg: DataConfig) -> tuple[TarPairs, dict[str, int]]:
    """The tar file, folder (the split's ``.tar`` files), glob, brace pattern or URL ``cfg.path`` names."""
    shards = find_shards(cfg.path, cfg.split, ".tar")
    source = TarPairs(shards, cfg)
    return source, source.stats


def looks_like_tar(path: str) -> bool:
    """For ``data.format = auto``: a ``.tar`` path or pattern, or a local folder with ``.tar`` shards and no
    parquet files (a remote folder of shards needs ``data.format = webdataset`` or a ``*.tar`` glob)."""
    if path.lower().rstrip("/").endswith(".tar"):
        return True
    local = Path(path).expanduser()
    return (local.is_dir() and next(local.rglob("*.tar"), None) is not None
            and next(local.rglob("*.parquet"), None) is None)

