"""LoRA on the UNet through peft, saved and loaded in the diffusers format.

The file written is ``pytorch_lora_weights.safetensors`` (via the pipeline's ``save_lora_weights``, with the
adapter metadata so rank and alpha round-trip), which users load with ``pipe.load_lora_weights(dir)``.
Resuming loads the weights back into the SAME adapter ("default"), never a second one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffalign.config import LoraConfig
from diffalign.models.base import DiffusionModel, unwrap

ADAPTER = "default"
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def add_lora(unet: torch.nn.Module, cfg: LoraConfig) -> list[torch.nn.Parameter]:
    """Inject adapters into the UNet; returns the trainable parameters (kept in fp32)."""
    from peft import LoraConfig as PeftLoraConfig

    peft_cfg = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.rank,
                              init_lora_weights=True if cfg.init == "default" else cfg.init,
                              target_modules=list(cfg.target_modules))
    unet.add_adapter(peft_cfg, adapter_name=ADAPTER)
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights with diffusers key names (no ``unet.`` prefix)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unwrap(unet), adapter_name=ADAPTER))


def save_lora(model: DiffusionModel, directory: str | Path) -> Path:
    """Write the UNet LoRA as ``pytorch_lora_weights.safetensors`` loadable by ``pipe.load_lora_weights``."""
    unet = unwrap(model.unet)
    layers = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in lora_state_dict(unet).items()}
    model.pipeline_class().save_lora_weights(
        str(directory), unet_lora_layers=layers, safe_serialization=True,
        unet_lora_adapter_metadata=unet.peft_config[ADAPTER].to_dict())
    return Path(directory) / WEIGHTS_NAME


def load_lora(unet: torch.nn.Module, directory: str | Path) -> None:
    """Load a saved LoRA into the existing "default" adapter; every key must match."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA weights at {path}")
    state = {k.removeprefix("unet."): v for k, v in load_file(path).items() if k.startswith("unet.")}
    state = convert_unet_state_dict_to_peft(state)
    result = set_peft_model_state_dict(unwrap(unet), state, adapter_name=ADAPTER)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(f"{path}: {len(unexpected)} keys do not match the adapter, e.g. {unexpected[:3]}")
