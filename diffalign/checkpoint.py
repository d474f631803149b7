"""Checkpoint folders on disk: atomic writes, keep-last-K, finding the newest, RNG state round-trips.

A checkpoint is written into ``.tmp-<name>`` and renamed into place only when complete, so a crash never
leaves a half-written ``checkpoint-<step>``. Tensors are saved with ``torch.save`` and always read back with
``torch.load(weights_only=True)`` (no arbitrary unpickling); weights are safetensors.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


def checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints in a run folder, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir()
             if (m := CHECKPOINT_RE.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def resolve_resume(run_dir: str | Path, resume: str | None) -> Path | None:
    """`latest` -> newest complete checkpoint (or None when there is none); a path must exist."""
    if not resume:
        return None
    if resume == "latest":
        found = checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"train.resume={resume}: not a complete checkpoint (no {STATE_FILE})")
    return path


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


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a file through a temporary sibling and a rename: readers see the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def prune(run_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints."""
    found = checkpoints(run_dir)
    for path in found[: max(len(found) - keep_last, 0)]:
        shutil.rmtree(path)


def write_state(directory: Path, state: dict[str, Any]) -> None:
    (directory / STATE_FILE).write_text(json.dumps(state, indent=2))


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
    return torch.load(path, map_location="cpu", weights_only=True)
