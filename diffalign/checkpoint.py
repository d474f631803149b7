"""Checkpoint folders on disk: atomic writes, keep-last-K, finding the newest, RNG state round-trips.

A checkpoint is written into ``.tmp-<name>`` and renamed into place only when complete, so a crash never
leaves a half-written ``checkpoint-<step>``. Its ``trainer_state.json`` (written last) lists every other file
with its size and CRC-32, and ``verify`` checks them before a resume, so a checkpoint truncated or overwritten
afterwards is found and named instead of failing inside ``torch.load``. Pruned checkpoints are renamed to
``.del-<name>`` before they are deleted, so a kill during pruning never leaves a folder that looks complete.
Tensors are saved with ``torch.save`` and always read back with ``torch.load(weights_only=True)`` (no arbitrary
unpickling); weights are safetensors.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
_CHUNK = 1 << 24

log = logging.getLogger("diffalign")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the folder and the file at fault."""


def checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints in a run folder, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir()
             if (m := CHECKPOINT_RE.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def resolve_resume(run_dir: str | Path, resume: str | None) -> Path | None:
    """`latest` -> the newest checkpoint that verifies (older ones are tried, with a warning, when the newest
    is damaged; None when there is none); an explicit folder must exist and verify."""
    if not resume:
        return None
    if resume == "latest":
        found = checkpoints(run_dir)
        damaged = []
        for path in reversed(found):
            problems = verify(path)
            if not problems:
                if damaged:
                    log.warning("train.resume=latest: %s; resuming from the previous complete checkpoint %s",
                                "; ".join(damaged), path)
                return path
            damaged.append(f"{path} is damaged ({problems[0]})")
        if damaged:
            raise CheckpointError("train.resume=latest: every checkpoint is damaged: " + "; ".join(damaged))
        return None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"train.resume={resume}: not a complete checkpoint (no {STATE_FILE})")
    problems = verify(path)
    if problems:
        raise CheckpointError(f"train.resume={resume}: the checkpoint is damaged: " + "; ".join(problems))
    return path


def crc32(path: Path) -> int:
    value = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            value = zlib.crc32(chunk, value)
    return value


def file_records(directory: Path) -> dict[str, dict[str, int]]:
    """{relative path: {size, crc32}} for every file below ``directory`` except the state file."""
    return {p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "crc32": crc32(p)}
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != STATE_FILE}


def verify(directory: Path) -> list[str]:
    """What is wrong with a checkpoint folder (empty when its files match the sizes and CRCs it recorded)."""
    try:
        state = read_state(directory)
    except (OSError, ValueError) as err:
        return [f"{directory / STATE_FILE}: unreadable ({err})"]
    problems = []
    for name, record in state.get("files", {}).items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != record["size"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, {record['size']} were written")
        elif crc32(path) != record["crc32"]:
            problems.append(f"{path}: contents changed since it was written (CRC-32 mismatch)")
    return problems


def temp_dir(target: str | Path) -> Path:
    """A fresh, empty temporary sibling of ``target`` to fill before ``commit``."""
    target = Path(target)
    tmp = target.with_name(f".tmp-{target.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, target: str | Path) -> Path:
    """Move a filled temporary folder into place; an existing ``target`` is replaced only afterwards."""
    target = Path(target)
    if target.exists():
        old = target.with_name(f".old-{target.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old)
    else:
        os.replace(tmp, target)
    return target


def write_atomic(target: str | Path, fill: Callable[[Path], None]) -> Path:
    """Create ``target`` by filling a temporary sibling folder and renaming it when ``fill`` returns."""
    tmp = temp_dir(target)
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return commit(tmp, target)


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """The one way a file is written in place: the block writes the temporary sibling it is given, which then
    replaces ``path`` by a rename (readers see the old file or the new one), or is removed if the block fails."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def remove_tree(path: Path) -> None:
    """Rename a folder to ``.del-<name>`` and then delete it: it stops looking like a checkpoint at once."""
    doomed = path.with_name(f".del-{path.name}")
    if doomed.exists():
        shutil.rmtree(doomed)
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def prune(run_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (``keep_last`` >= 1: the newest always stays)."""
    found = checkpoints(run_dir)
    for path in found[: max(len(found) - max(keep_last, 1), 0)]:
        remove_tree(path)


def write_state(directory: Path, state: dict[str, Any]) -> None:
    """Write the state file last, listing the size and CRC-32 of every other file in the folder."""
    (directory / STATE_FILE).write_text(json.dumps({**state, "files": file_records(directory)}, indent=2))


def read_state(directory: Path) -> dict[str, Any]:
    return json.loads((directory / STATE_FILE).read_text())


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states in a form torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
             "numpy_rest": [kind, int(pos), int(has_gauss), float(cached)], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    kind, pos, has_gauss, cached = state["numpy_rest"]
    np.random.set_state((kind, state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def load_tensors(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot be read ({type(err).__name__}: {err})") from err
