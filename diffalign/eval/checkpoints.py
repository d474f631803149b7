"""What to compare with the base model: finding trained weights on disk and applying them to a loaded model.

A checkpoint is either a LoRA (``pytorch_lora_weights.safetensors``, loaded as a peft adapter and removed
afterwards) or a fully fine-tuned denoiser in the diffusers format (``unet/`` or ``transformer/``, swapped in and
back). Run folders resolve to their ``final/``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffalign.config import ConfigError
from diffalign.models.base import DiffusionModel, unwrap
from diffalign.models.lora import WEIGHTS_NAME

DENOISER_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                    "diffusion_pytorch_model.safetensors.index.json")   # a full SDXL UNet in fp32 is sharded
DENOISER_FOLDERS = ("unet", "transformer")                                  # as the families save them
ADAPTER = "diffalign_eval"


@dataclass(frozen=True)
class Checkpoint:
    label: str          # the column name in grids and tables
    path: Path          # the LoRA folder, or the denoiser folder
    kind: str           # "lora" or "full"

    @property
    def weights(self) -> list[Path]:
        """The weight files (a LoRA file, or every denoiser shard and index)."""
        if self.kind == "lora":
            return [self.path / WEIGHTS_NAME]
        return sorted(p for p in self.path.iterdir() if p.name.startswith("diffusion_pytorch_model"))

    def fingerprint(self) -> dict[str, Any]:
        """Identifies the weights' contents on disk (names, sizes, mtimes), so stale samples are never reused."""
        files = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in self.weights}
        return {"path": str(self.path), "kind": self.kind, "files": files}


def resolve(entry: Any, key: str) -> Checkpoint:
    """A checkpoint from a config entry (a path, or {name, path}); the error names the key and what was found."""
    label = None
    if isinstance(entry, dict):
        unknown = set(entry) - {"name", "path"}
        if unknown or "path" not in entry:
            raise ConfigError(f"`{key}`: a checkpoint mapping has `path` and optional `name`; got {entry!r}")
        label, entry = entry.get("name"), entry["path"]
    if not isinstance(entry, str) or not entry:
        raise ConfigError(f"`{key}`: expected a folder path, got {entry!r}")
    folder = Path(entry)
    if (folder / "final").is_dir() and not (folder / WEIGHTS_NAME).is_file():
        folder = folder / "final"
    kind, weights_dir = _kind(folder)
    if kind is None:
        raise ConfigError(f"`{key}` = {entry}: no weights found; expected {WEIGHTS_NAME} (LoRA), unet/ or "
                          f"transformer/ (full fine-tuning), a diffusers model folder, or a run folder with final/")
    return Checkpoint(label=str(label) if label else default_label(folder), path=weights_dir, kind=kind)


def _kind(folder: Path) -> tuple[str | None, Path]:
    if (folder / WEIGHTS_NAME).is_file():
        return "lora", folder
    for weights_dir in (*(folder / name for name in DENOISER_FOLDERS), folder):
        if (weights_dir / "config.json").is_file() and any((weights_dir / n).is_file() for n in DENOISER_WEIGHTS):
            return "full", weights_dir
    return None, folder


def default_label(folder: Path) -> str:
    """`run/final`, `run/checkpoint-500`: the run folder's name and the weights folder's name."""
    folder = folder.resolve()
    if folder.name == "final" or re.fullmatch(r"checkpoint-\d+", folder.name):
        return f"{folder.parent.name}/{folder.name}"
    return folder.name


def resolve_all(entries: list, run_dir: str | Path) -> list[Checkpoint]:
    """The configured checkpoints (unique labels), or the run's own final weights when none are listed."""
    if not entries:
        final = Path(run_dir) / "final"
        return [resolve(str(final), "eval.checkpoints")] if final.is_dir() else []
    found = [resolve(e, f"eval.checkpoints[{i}]") for i, e in enumerate(entries)]
    labels = [c.label for c in found]
    clash = sorted({x for x in labels if labels.count(x) > 1 or x == "base"})
    if clash:
        raise ConfigError(f"`eval.checkpoints`: label(s) {', '.join(clash)} are not unique (or are `base`); "
                          "give each entry a distinct {name: ..., path: ...}")
    return found


def load_adapter(model: DiffusionModel, ckpt: Checkpoint) -> None:
    """Load the LoRA file as the denoiser's active adapter; keys that match no layer are an error, not a no-op."""
    from safetensors import safe_open

    denoiser, family = unwrap(model.denoiser), model.lora_prefix
    with safe_open(str(ckpt.path / WEIGHTS_NAME), framework="pt") as f:
        keys = list(f.keys())
    prefix = family if any(k.startswith(family + ".") for k in keys) else None   # pipeline file, or bare keys
    mismatch = ConfigError(f"{ckpt.path / WEIGHTS_NAME}: its {len(keys)} keys (e.g. {keys[:2]}) match no layer of "
                           f"the {model.denoiser_class_name}; expected diffusers LoRA keys starting {family}.")
    try:
        denoiser.load_lora_adapter(str(ckpt.path), prefix=prefix, adapter_name=ADAPTER, weight_name=WEIGHTS_NAME,
                                   local_files_only=True)
    except (IndexError, KeyError, ValueError) as err:     # diffusers' ways of failing on foreign keys
        raise mismatch from err
    if not any(ADAPTER in getattr(m, "lora_A", {}) for m in denoiser.modules()):   # loaded nothing: not a no-op
        if ADAPTER in getattr(denoiser, "peft_config", {}):
            denoiser.delete_adapters(ADAPTER)
        raise mismatch
    denoiser.set_adapters([ADAPTER])


@contextlib.contextmanager
def applied(model: DiffusionModel, ckpt: Checkpoint | None) -> Iterator[None]:
    """Inside the block the model's denoiser carries the checkpoint's weights; the base one is restored after."""
    if ckpt is None:
        yield
        return
    if ckpt.kind == "lora":
        load_adapter(model, ckpt)
        try:
            yield
        finally:
            unwrap(model.denoiser).delete_adapters(ADAPTER)
        return
    tuned = model.load_denoiser(ckpt.path).to(model.device)
    tuned.requires_grad_(False).eval()
    base, model.denoiser = model.denoiser, tuned
    try:
        yield
    finally:
        model.denoiser = base
        del tuned
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
