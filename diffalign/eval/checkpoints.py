"""What to compare with the base model: finding trained weights on disk and applying them to a loaded model.

A checkpoint is either a LoRA (``pytorch_lora_weights.safetensors``, loaded as a peft adapter and removed
afterwards) or a full UNet in the diffusers format (swapped in and back). Run folders resolve to their ``final/``.
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

UNET_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                "diffusion_pytorch_model.safetensors.index.json")    # full SDXL UNets in fp32 are saved sharded
ADAPTER = "diffalign_eval"


@dataclass(frozen=True)
class Checkpoint:
    label: str          # the column name in grids and tables
    path: Path          # the LoRA folder, or the UNet folder
    kind: str           # "lora" or "unet"

    @property
    def weights(self) -> list[Path]:
        """The weight files (a LoRA file, or every UNet shard and index)."""
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
        raise ConfigError(f"`{key}` = {entry}: no weights found; expected {WEIGHTS_NAME} (LoRA), unet/ (full "
                          f"fine-tuning) or a diffusers UNet folder, or a run folder with final/")
    return Checkpoint(label=str(label) if label else default_label(folder), path=weights_dir, kind=kind)


def _kind(folder: Path) -> tuple[str | None, Path]:
    if (folder / WEIGHTS_NAME).is_file():
        return "lora", folder
    for unet_dir in (folder / "unet", folder):
        if (unet_dir / "config.json").is_file() and any((unet_dir / n).is_file() for n in UNET_WEIGHTS):
            return "unet", unet_dir
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


def load_adapter(unet: torch.nn.Module, ckpt: Checkpoint) -> None:
    """Load the LoRA file as the active adapter; a file whose keys match no UNet layer is an error, not a no-op."""
    from safetensors import safe_open

    with safe_open(str(ckpt.path / WEIGHTS_NAME), framework="pt") as f:
        keys = list(f.keys())
    prefix = "unet" if any(k.startswith("unet.") for k in keys) else None   # diffusers pipeline or bare UNet keys
    mismatch = ConfigError(f"{ckpt.path / WEIGHTS_NAME}: its {len(keys)} keys (e.g. {keys[:2]}) match no UNet "
                           "layer; expected diffusers LoRA keys such as unet.down_blocks.0...lora_A.weight")
    try:
        unet.load_lora_adapter(str(ckpt.path), prefix=prefix, adapter_name=ADAPTER, weight_name=WEIGHTS_NAME,
                               local_files_only=True)
    except (IndexError, KeyError, ValueError) as err:     # diffusers' ways of failing on foreign keys
        raise mismatch from err
    if not any(ADAPTER in getattr(m, "lora_A", {}) for m in unet.modules()):   # loaded nothing: not a silent no-op
        if ADAPTER in getattr(unet, "peft_config", {}):
            unet.delete_adapters(ADAPTER)
        raise mismatch
    unet.set_adapters([ADAPTER])


@contextlib.contextmanager
def applied(model: DiffusionModel, ckpt: Checkpoint | None) -> Iterator[None]:
    """Inside the block the model's UNet carries the checkpoint's weights; the base UNet is restored after."""
    if ckpt is None:
        yield
        return
    unet = unwrap(model.unet)
    if ckpt.kind == "lora":
        load_adapter(unet, ckpt)
        try:
            yield
        finally:
            unet.delete_adapters(ADAPTER)
        return
    from diffusers import UNet2DConditionModel

    fp16_only = not (ckpt.path / UNET_WEIGHTS[0]).is_file() and (ckpt.path / UNET_WEIGHTS[1]).is_file()
    tuned = UNet2DConditionModel.from_pretrained(ckpt.path, torch_dtype=model.dtype,
                                                 variant="fp16" if fp16_only else None).to(model.device)
    tuned.requires_grad_(False).eval()
    base, model.unet = model.unet, tuned
    try:
        yield
    finally:
        model.unet = base
        del tuned
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
