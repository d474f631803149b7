"""LoRA on the denoiser through peft, saved and loaded in the diffusers format of the model's family.

The file written is ``pytorch_lora_weights.safetensors`` (via the pipeline's ``save_lora_weights``, with the
adapter metadata so rank and alpha round-trip), which users load with ``pipe.load_lora_weights(dir)``.
Resuming loads the weights back into the SAME adapter ("default"), never a second one.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from diffalign.models.base import UNET_LORA_TARGETS, DiffusionModel, unwrap

if TYPE_CHECKING:
    from diffalign.config import LoraConfig

ADAPTER = "default"
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def add_lora(denoiser: torch.nn.Module, cfg: LoraConfig) -> list[torch.nn.Parameter]:
    """Inject adapters into the denoiser's ``cfg.target_modules`` (unset: the UNet's attention projections; the
    trainer first sets it to the family's ``lora_targets``); returns the trainable parameters (kept in fp32)."""
    from peft import LoraConfig as PeftLoraConfig

    targets = cfg.target_modules if cfg.target_modules is not None else UNET_LORA_TARGETS
    peft_cfg = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.rank,
                              init_lora_weights=True if cfg.init == "default" else cfg.init,
                              target_modules=list(targets))
    denoiser.add_adapter(peft_cfg, adapter_name=ADAPTER)
    params = [p for n, p in denoiser.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def lora_state_dict(denoiser: torch.nn.Module, state: dict[str, torch.Tensor] | None = None
                    ) -> dict[str, torch.Tensor]:
    """The adapter weights in peft's spelling (``<module>.lora_A.weight`` / ``lora_B``), without the family's
    prefix: the one spelling diffusers' loaders read for every module. (diffusers' convert_state_dict_to_diffusers
    renames only attention projections, to ``lora.down``/``lora.up``, and a file mixing both spellings loads only
    part of its modules, since the loader picks the spelling from the first key.) Taken from ``state`` (the
    denoiser's whole state dict, e.g. gathered from shards) when given, else from the denoiser itself."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(unwrap(denoiser), state_dict=state, adapter_name=ADAPTER)


def save_lora(model: DiffusionModel, directory: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the denoiser's LoRA as ``pytorch_lora_weights.safetensors``, loadable by ``pipe.load_lora_weights``
    (from ``state``, the denoiser's whole state dict, when given: see :func:`lora_state_dict`)."""
    denoiser = unwrap(model.denoiser)
    layers = {k: v.detach().to("cpu", torch.float32).contiguous()
              for k, v in lora_state_dict(denoiser, state).items()}
    model.save_lora_file(directory, layers, denoiser.peft_config[ADAPTER].to_dict())
    return Path(directory) / WEIGHTS_NAME


def _read_lora(model: DiffusionModel, directory: str | Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """(file, its layers in peft's spelling without the family prefix)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from safetensors.torch import load_file

    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA weights at {path}")
    prefix = model.lora_prefix + "."
    state = {k.removeprefix(prefix): v for k, v in load_file(path).items() if k.startswith(prefix)}
    return path, convert_unet_state_dict_to_peft(state)   # diffusers -> peft key names, for any denoiser


def lora_module_state(model: DiffusionModel, directory: str | Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A saved LoRA keyed by the denoiser's own parameter names (``<module>.lora_A.default.weight``), as
    ``load_state_dict`` (or a sharded load) takes them: (file, state)."""
    path, state = _read_lora(model, directory)
    out = {}
    for key, value in state.items():
        head, sep, tail = key.rpartition(".lora_")            # "<module>", ".lora_", "A.weight"
        kind, _, leaf = tail.partition(".")
        out[f"{head}{sep}{kind}.{ADAPTER}.{leaf}" if sep else key] = value
    return path, out


def load_lora(model: DiffusionModel, directory: str | Path) -> None:
    """Load a saved LoRA into the denoiser's existing "default" adapter; every key must match."""
    from peft.utils import set_peft_model_state_dict

    path, state = _read_lora(model, directory)
    result = set_peft_model_state_dict(unwrap(model.denoiser), state, adapter_name=ADAPTER)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(f"{path}: {len(unexpected)} keys do not match the adapter, e.g. {unexpected[:3]}")
