"""Frozen CLIP towers (open_clip or transformers) behind one interface, differentiable preprocessing, weight loading.

Weights come from one of: an open_clip pretrained tag (``pretrained``), a transformers hub id or local directory
(``model_name``), or a state-dict file (``checkpoint``): ``.safetensors``, or ``.pt``/``.pth``/``.bin``/``.ckpt``
read with ``torch.load(weights_only=True)``. ``checkpoint="hf-hub:org/repo/file.pt"`` fetches the file with
huggingface_hub. ``model_config`` builds a random-weight model from a config dict (tests, offline benchmarks).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffalign.options import parse_dtype
from diffalign.rewards.base import Reward

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP; also used by the LAION ViT-H-14 / PickScore processor
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HF_HUB_PREFIX = "hf-hub:"
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
BACKENDS = ("open_clip", "transformers")


def clip_preprocess(images: torch.Tensor, size: int, mean: torch.Tensor, std: torch.Tensor,
                    resize: str = "shortest") -> torch.Tensor:
    """[B,3,H,W] in [0,1] -> [B,3,size,size], normalised; pure torch (no uint8 rounding), so gradients reach
    ``images``.

    ``shortest`` (CLIP's, PickScore's): bicubic resize of the short side to ``size``, centre crop. ``longest``
    (HPSv2's ``ResizeMaxSize``): bicubic resize of the long side to ``size`` (sizes rounded), then zero (black)
    padding to a square, ``pad // 2`` on the left and top, before normalisation. Square images give the same.
    """
    height, width = images.shape[-2:]
    if resize == "longest":
        scale = size / max(height, width)
        new_size = (round(height * scale), round(width * scale))
        if new_size != (height, width):
            images = F.interpolate(images, size=new_size, mode="bicubic", align_corners=False, antialias=True)
        pad_h, pad_w = size - new_size[0], size - new_size[1]
        images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    else:
        if min(height, width) != size:
            scale = size / min(height, width)
            new_size = (size, int(width * scale)) if height <= width else (int(height * scale), size)
            images = F.interpolate(images, size=new_size, mode="bicubic", align_corners=False, antialias=True)
            height, width = images.shape[-2:]
        top, left = int(round((height - size) / 2)), int(round((width - size) / 2))
        images = images[..., top : top + size, left : left + size]
    return (images - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def resolve_checkpoint(checkpoint: str | Path) -> Path:
    """A local path, or ``hf-hub:org/repo/path/in/repo`` downloaded (or read from cache) with huggingface_hub."""
    text = str(checkpoint)
    if not text.startswith(HF_HUB_PREFIX):
        return Path(checkpoint)
    org, repo, *rest = text[len(HF_HUB_PREFIX) :].split("/")
    if not rest:
        raise ValueError(f"hub checkpoints are written hf-hub:org/repo/filename; got {text!r}")
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id=f"{org}/{repo}", filename="/".join(rest)))


def load_state_dict_file(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict (safetensors, or torch.load weights_only=True); unwrap ``state_dict``, drop ``module.``."""
    path = resolve_checkpoint(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path))
    elif path.suffix in TORCH_SUFFIXES:
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"unsupported checkpoint format {path.suffix!r}: use .safetensors or {TORCH_SUFFIXES}")
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]  # HPSv2 checkpoints wrap the model state like this
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(module: nn.Module, checkpoint: str | Path) -> None:
    """Load a state-dict file into ``module`` strictly."""
    try:
        module.load_state_dict(load_state_dict_file(checkpoint), strict=True)
    except RuntimeError as err:
        raise ValueError(f"checkpoint {checkpoint} does not fit {type(module).__name__}: {err}") from err


class ClipBackbone(nn.Module):
    """Frozen CLIP image and text towers: images in [0,1] and prompts in, raw (unnormalised) embeddings out."""

    def __init__(self, model: nn.Module, image_size: int, embed_dim: int, tokenize: Callable[[list[str]], Any]):
        super().__init__()
        self.model = model
        self.image_size, self.embed_dim, self.tokenize = image_size, embed_dim, tokenize
        self.resize = "shortest"        # "longest" for HPSv2 (see clip_preprocess)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD), persistent=False)

    @property
    def logit_scale(self) -> torch.Tensor:
        """CLIP's learned log temperature (a scalar)."""
        return self.model.logit_scale

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [0,1] -> [B,D] float32."""
        pixels = clip_preprocess(images.float(), self.image_size, self.mean.float(), self.std.float(), self.resize)
        return self.encode_image(pixels.to(self.logit_scale.dtype)).float()

    def text_features(self, prompts: list[str]) -> torch.Tensor:
        """B prompts -> [B,D] float32."""
        ids = self.tokenize(prompts).to(self.mean.device)
        return self.encode_text(ids).float()

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class OpenClipBackbone(ClipBackbone):
    """An ``open_clip`` CLIP model."""

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(ids)


class HFClipBackbone(ClipBackbone):
    """A transformers ``CLIPModel``; towers called directly so the output type is the same across versions."""

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.visual_projection(self.model.vision_model(pixel_values=pixels).pooler_output)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        # Causal attention: padding after the end token cannot change the pooled end-token state, so no mask.
        return self.model.text_projection(self.model.text_model(input_ids=ids).pooler_output)


def open_clip_backbone(model_name: str, pretrained: str | None, model_config: Mapping | None) -> ClipBackbone:
    """open_clip model by architecture name (+ pretrained tag or file), or random weights from ``model_config``."""
    import open_clip

    if model_config is not None:
        model = open_clip.CLIP(**copy.deepcopy(dict(model_config)))
        tokenize = open_clip.SimpleTokenizer(context_length=model.context_length)
    else:
        model = open_clip.create_model(model_name, pretrained=pretrained)
        tokenize = open_clip.get_tokenizer(model_name)
    backbone = OpenClipBackbone(model, _square(model.visual.image_size), model.visual.output_dim, tokenize)
    mean, std = getattr(model.visual, "image_mean", None), getattr(model.visual, "image_std", None)
    if mean is not None and std is not None:
        backbone.mean, backbone.std = torch.tensor(mean), torch.tensor(std)
    return backbone


def hf_clip_backbone(model_name: str, model_config: Mapping | None, dtype: torch.dtype) -> ClipBackbone:
    """transformers CLIPModel from a hub id / local directory, or random weights from a CLIPConfig dict.

    Prompts are tokenised with open_clip's copy of the CLIP BPE (same ids as the transformers CLIP tokenizers).
    """
    import open_clip
    from transformers import CLIPConfig, CLIPModel

    if model_config is not None:
        model = CLIPModel(CLIPConfig(**copy.deepcopy(dict(model_config))))
    else:
        model = CLIPModel.from_pretrained(model_name, dtype=dtype)
    config = model.config
    tokenize = open_clip.SimpleTokenizer(context_length=config.text_config.max_position_embeddings)
    return HFClipBackbone(model, _square(config.vision_config.image_size), config.projection_dim, tokenize)


def build_clip(
    backend: str,
    model_name: str,
    *,
    pretrained: str | None = None,
    checkpoint: str | None = None,
    model_config: Mapping | None = None,
    dtype: str | torch.dtype = "float32",
) -> ClipBackbone:
    """A frozen CLIP backbone (see the module docstring for where weights come from)."""
    torch_dtype = parse_dtype(dtype)
    if backend == "open_clip":
        backbone = open_clip_backbone(model_name, pretrained, model_config)
        if pretrained is None and checkpoint is None and model_config is None:
            warnings.warn(f"open_clip {model_name}: no pretrained tag or checkpoint, weights are random", stacklevel=2)
    elif backend == "transformers":
        if pretrained is not None:
            raise ValueError("'pretrained' is an open_clip tag; for transformers give the hub id/path as model_name")
        backbone = hf_clip_backbone(model_name, model_config, torch_dtype)
    else:
        raise ValueError(f"unknown CLIP backend {backend!r}; choose one of {BACKENDS}")
    if checkpoint is not None:
        load_weights(backbone.model, checkpoint)
    return backbone.to(torch_dtype)


def _square(size: int | tuple[int, int] | list[int]) -> int:
    """The side of a square image size given as an int or a pair."""
    if isinstance(size, int):
        return size
    if size[0] != size[1]:
        raise ValueError(f"only square CLIP inputs are supported; got {tuple(size)}")
    return int(size[0])


class ModelReward(Reward):
    """A reward computed by a frozen module; the module follows the images' device unless ``device`` is fixed."""

    def __init__(self, module: nn.Module, device: str | None = None) -> None:
        self.module = module.eval().requires_grad_(False)
        self.device = torch.device(device) if device is not None else None
        self._module_device: torch.device | None = None

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        device = self.device or images.device
        if device != self._module_device:
            self.module.to(device)
            self._module_device = device
        return self.forward(images.to(device), prompts).to(images.device)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Scores [B] on the module's device."""
        raise NotImplementedError
