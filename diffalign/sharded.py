"""Whole (unsharded) state of a sharded denoiser and its optimizer, through ``torch.distributed.checkpoint``.

Under FSDP2 every process holds a slice of each parameter (a DTensor) and of its Adam state. A checkpoint keeps
the whole tensors, gathered to the main process's CPU memory and written by it alone, in the same files an
unsharded run writes (the LoRA file, or the denoiser folder), so a sharded run's weights load anywhere. On resume
the main process reads them and they are scattered back. Every function here is a collective: every process
calls it, in the same order.
"""

from __future__ import annotations

from typing import Any

import torch


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether the module's parameters are sharded DTensors (FSDP2's ``fully_shard``)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def _options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer whole, on the CPU of the main process (an empty dict on the others)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_options(cpu_offload=True))


def full_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state whole and keyed by parameter name, on the main process's CPU (empty elsewhere)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer, options=_options(cpu_offload=True))


def load_model_state(module: torch.nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> list[str]:
    """Scatter whole tensors that only the main process read (``{}`` on the others) into the shards; returns
    the names in ``state`` the module does not have (with ``strict=False``, missing names are allowed)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    result = set_model_state_dict(module, state, options=_options(broadcast_from_rank0=True, strict=strict))
    return list(getattr(result, "unexpected_keys", []) or [])


def load_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, state, options=_options(broadcast_from_rank0=True))


def save_denoiser_folder(denoiser: torch.nn.Module, weights: dict[str, torch.Tensor], folder: Any) -> None:
    """A whole-denoiser folder as ``save_pretrained`` writes it (config.json, safetensors files of at most 10 GB
    with diffusers' index name when there are several), from gathered weights: a sharded module cannot save
    itself."""
    from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
    from huggingface_hub import save_torch_state_dict

    denoiser.save_config(folder)
    stem, ext = SAFETENSORS_WEIGHTS_NAME.rsplit(".", 1)                 # diffusion_pytorch_model, safetensors
    save_torch_state_dict({k: v.contiguous() for k, v in weights.items()}, folder,
                          filename_pattern=f"{stem}{{suffix}}.{ext}", max_shard_size="10GB")
