"""Model families over diffusers pipelines. ``load_model`` detects the family from model_index.json."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from diffalign.models.base import Cond, DiffusionModel
from diffalign.models.flux import FluxModel
from diffalign.models.sd import SDModel
from diffalign.models.sd3 import SD3Model
from diffalign.models.sdxl import SDXLModel
from diffalign.options import ConfigError

if TYPE_CHECKING:
    from diffalign.config import ModelConfig

FAMILIES: dict[str, type[DiffusionModel]] = {
    cls.pipeline_class_name: cls for cls in (SDModel, SDXLModel, SD3Model, FluxModel)}

__all__ = ["Cond", "DiffusionModel", "FAMILIES", "FluxModel", "SD3Model", "SDModel", "SDXLModel", "detect_family",
           "load_model"]


def detect_family(pretrained: str, revision: str | None = None) -> type[DiffusionModel]:
    """The family class for a hub id or local pipeline folder, from its model_index.json."""
    from diffusers import DiffusionPipeline

    if not pretrained:
        raise ConfigError("model.pretrained is empty: give a hub id or a local diffusers pipeline folder")
    try:
        index = DiffusionPipeline.load_config(pretrained, revision=revision)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.pretrained={pretrained!r}: cannot read model_index.json ({err})") from None
    name = index.get("_class_name", "")
    if name not in FAMILIES:
        raise ConfigError(f"model.pretrained={pretrained!r}: pipeline class {name!r} is not supported; "
                         f"supported: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def load_model(cfg: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               denoiser: bool = True) -> DiffusionModel:
    """The family's model on ``device``: denoiser and text encoders in ``dtype``, the VAE in model.vae_dtype;
    ``denoiser=False`` skips the denoiser (encoders only, for the cache)."""
    return detect_family(cfg.pretrained, cfg.revision).from_pretrained(cfg, device, dtype, denoiser)
