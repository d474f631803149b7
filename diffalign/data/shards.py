"""Where shard files come from: a local file, folder or glob, or an fsspec URL (``s3://``, ``hf://``, ``memory://``).

Parquet and tar sources list their shards here, so both accept the same path forms and pick a split's files by
the same rules (``_choose_split``). A URL is read through fsspec (a ``datasets`` dependency, so always present)
with no local copy, which is how a set larger than one disk is trained on; local files are opened directly.
Handles are per process (``ShardHandles``): a handle inherited through ``fork`` by a DataLoader worker would share
its file offset with the parent, so every process opens its own.
"""

from __future__ import annotations

import glob as globlib
import itertools
import os
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

_GLOB = re.compile(r"[*?\[]")
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")


def is_url(path: str) -> bool:
    """A path with a scheme (``s3://...``, ``hf://...``): read through fsspec, never through ``datasets``."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", path) is not None


def expand_braces(pattern: str) -> list[str]:
    """webdataset's shard notation: ``shard-{000..099}.tar`` (zero-padded ranges) and ``{a,b}`` alternatives."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[:match.start()], pattern[match.end():]
    numbers = _RANGE.match(body)
    if numbers:
        lo, hi = numbers.groups()
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        options = [str(k).zfill(width) for k in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [head + option + rest for option in options for rest in expand_braces(tail)]


@dataclass
class ShardSet:
    """The files of one source, in reading order. ``files`` are full paths (local, or the filesystem's own paths
    for a URL); ``names`` are what messages show (relative to the folder when one was given)."""

    label: str                       # data.path as given
    files: list[str]
    names: list[str]
    fs: Any = None                   # an fsspec filesystem for URLs; None = local files

    def display(self, k: int) -> str:
        """Shard ``k``'s full path or URL, for messages about the whole file."""
        return self.files[k] if self.fs is None else self.fs.unstrip_protocol(self.files[k])

    def open(self, k: int) -> Any:
        """A binary, seekable file object for shard ``k``."""
        return open(self.files[k], "rb") if self.fs is None else self.fs.open(self.files[k], "rb")

    def stat(self, k: int) -> list[Any]:
        """[size, modification time or ETag]: enough for a cache to notice a changed shard."""
        if self.fs is None:
            st = os.stat(self.files[k])
            return [st.st_size, st.st_mtime_ns]
        info = self.fs.info(self.files[k])
        stamp = next((info[key] for key in ("ETag", "etag", "mtime", "LastModified", "last_modified", "created")
                      if info.get(key) is not None), None)
        return [info.get("size"), str(stamp)]


def _error(message: str) -> Exception:
    from diffalign.data.pairs import DataError

    return DataError(message)


def choose_split(paths: list[PurePosixPath], split: str, suffix: str, where: str) -> list[PurePosixPath]:
    """The split's files among ``paths`` (relative to the folder): ``<split>/**``, files named ``<split>-*`` or
    ``<split>.*`` anywhere below, or else unsplit files directly in the folder (not ones named like a split's
    shards, ``name-00000-of-00004``)."""
    kind = suffix.lstrip(".")
    shard = re.compile(rf"^(?P<split>.+?)-\d+-of-\d+{re.escape(suffix)}$")
    visible = [p for p in paths if not any(part.startswith(".") for part in p.parts)]
    files = sorted(p for p in visible if len(p.parts) > 1 and p.parts[0] == split)
    if files:
        return files
    named = re.compile(rf"^{re.escape(split)}(?:[-.].*)?{re.escape(suffix)}$")
    files = [p for p in visible if named.match(p.name)]
    if files:
        return sorted(files, key=lambda p: p.as_posix())
    direct = sorted(p for p in visible if len(p.parts) == 1)
    if direct and not any(shard.match(p.name) for p in direct):
        return direct
    splits = sorted({m["split"] for p in visible if (m := shard.match(p.name))})
    found = f"splits found: {', '.join(splits)}" if splits else f"{len(visible)} other {suffix} file(s) found"
    raise _error(f"{where}: no {kind} files for split {split!r} (looked for {split}/*{suffix}, {split}-*{suffix} "
                 f"or {split}{suffix}, and unsplit *{suffix} in the folder); {found}")


def split_files(folder: Path, split: str, suffix: str = ".parquet") -> list[Path]:
    """``choose_split`` over the ``*<suffix>`` files below a local folder."""
    found = [p.relative_to(folder) for p in folder.rglob(f"*{suffix}")]
    return [folder / p for p in choose_split([PurePosixPath(p.as_posix()) for p in found], split, suffix,
                                             str(folder))]


def _local(path: str, split: str, suffix: str) -> ShardSet:
    patterns = expand_braces(os.path.expanduser(path))
    if len(patterns) > 1 or _GLOB.search(patterns[0]):
        files = sorted(itertools.chain.from_iterable(
            sorted(globlib.glob(p)) if _GLOB.search(p) else [p] for p in patterns))
        missing = [f for f in files if not os.path.isfile(f)]
        if not files or missing:
            raise _error(f"{path}: {'no files match' if not files else f'no such file: {missing[0]}'}")
        return ShardSet(path, files, [os.path.basename(f) for f in files])
    local = Path(patterns[0])
    if local.is_file():
        return ShardSet(path, [str(local)], [local.name])
    if local.is_dir():
        files = split_files(local, split, suffix)
        return ShardSet(path, [str(f) for f in files], [f.relative_to(local).as_posix() for f in files])
    raise _error(f"{path}: no such file or folder")


def _remote(url: str, split: str, suffix: str) -> ShardSet:
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as err:      # an unknown scheme, or its fsspec backend is not installed
        raise _error(f"{url}: cannot open this URL through fsspec ({type(err).__name__}: {err})") from None
    patterns = expand_braces(root)
    if len(patterns) > 1 or _GLOB.search(patterns[0]):
        files = sorted(itertools.chain.from_iterable(
            sorted(fs.glob(p)) if _GLOB.search(p) else [p] for p in patterns))
        if not files:
            raise _error(f"{url}: no files match")
        return ShardSet(url, files, [PurePosixPath(f).name for f in files], fs)
    if fs.isfile(root):
        return ShardSet(url, [root], [PurePosixPath(root).name], fs)
    if fs.isdir(root):
        base = PurePosixPath(root.rstrip("/"))
        listed = [PurePosixPath(p) for p in fs.find(root) if p.endswith(suffix)]
        rel = [p.relative_to(base) for p in listed]
        chosen = choose_split(rel, split, suffix, url)
        return ShardSet(url, [str(base / p) for p in chosen], [p.as_posix() for p in chosen], fs)
    raise _error(f"{url}: no such file or folder")


def find_shards(path: str, split: str, suffix: str) -> ShardSet:
    """The shard files ``path`` names: a file, a folder (the split's files, see ``choose_split``), a glob or
    brace pattern; local, or a URL read through fsspec."""
    return _remote(path, split, suffix) if is_url(path) else _local(path, split, suffix)


class ShardHandles:
    """At most ``capacity`` open handles (least recently used closed first), reopened in a new process."""

    def __init__(self, opener: Callable[[int], Any], capacity: int) -> None:
        self.opener, self.capacity = opener, max(1, capacity)
        self._open: OrderedDict[int, Any] = OrderedDict()
        self._pid = os.getpid()

    def get(self, k: int) -> Any:
        if self._pid != os.getpid():          # inherited through fork: never share the parent's handles
            self._open, self._pid = OrderedDict(), os.getpid()
        if k in self._open:
            self._open.move_to_end(k)
            return self._open[k]
        handle = self._open[k] = self.opener(k)
        while len(self._open) > self.capacity:
            _, old = self._open.popitem(last=False)
            _close(old)
        return handle

    def close(self) -> None:
        for handle in self._open.values():
            _close(handle)
        self._open.clear()

    def __getstate__(self) -> dict[str, Any]:
        return {"opener": self.opener, "capacity": self.capacity}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["opener"], state["capacity"])


def _close(handle: Any) -> None:
    close = getattr(handle, "close", None)
    if close is not None:
        close()
