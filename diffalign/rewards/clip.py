"""Image-text similarity rewards on CLIP: clip_score, HPSv2 and PickScore.

Options shared by the model-backed rewards (see :mod:`diffalign.rewards.backbone`): ``model_name``,
``checkpoint``, ``model_config`` (random weights, for tests), ``device`` (default: follow the images) and ``dtype``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from diffalign.rewards.backbone import ClipBackbone, ModelReward, build_clip
from diffalign.rewards.base import Reward, register

DEFAULT_CLIP = {"transformers": "openai/clip-vit-large-patch14", "open_clip": "ViT-L-14-quickgelu"}
HPSV2_CHECKPOINT = "hf-hub:xswu/HPSv2/HPS_v2_compressed.pt"
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"


class ClipSimilarity(ModelReward):
    """cosine(image embedding, text embedding), times exp(logit_scale) when ``logit_scaled`` (PickScore)."""

    module: ClipBackbone

    def __init__(self, backbone: ClipBackbone, device: str | None, logit_scaled: bool = False) -> None:
        super().__init__(backbone, device)
        self.logit_scaled = logit_scaled

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        image_emb = F.normalize(self.module.image_features(images), dim=-1)  # [B,D]
        text_emb = F.normalize(self.module.text_features(prompts), dim=-1)  # [B,D]
        cosine = (image_emb * text_emb).sum(dim=-1)  # [B]
        return cosine * self.module.logit_scale.float().exp() if self.logit_scaled else cosine


@register("clip_score")
def clip_score(
    *,
    backend: str = "transformers",
    model_name: str | None = None,
    pretrained: str | None = None,
    checkpoint: str | None = None,
    model_config: Mapping | None = None,
    device: str | None = None,
    dtype: str = "float32",
) -> Reward:
    """Cosine of CLIP image and text embeddings (default: OpenAI CLIP ViT-L/14 through transformers).

    With ``backend="open_clip"``, weights come from ``pretrained`` (an open_clip tag, e.g. ``"openai"``) or
    ``checkpoint``; ``model_name`` defaults to ``ViT-L-14-quickgelu``.
    """
    name = model_name or DEFAULT_CLIP.get(backend, "")
    backbone = build_clip(
        backend, name, pretrained=pretrained, checkpoint=checkpoint, model_config=model_config, dtype=dtype
    )
    return ClipSimilarity(backbone, device)


@register("hpsv2")
def hpsv2(
    *,
    checkpoint: str | None = HPSV2_CHECKPOINT,
    model_name: str = "ViT-H-14",
    model_config: Mapping | None = None,
    device: str | None = None,
    dtype: str = "float32",
) -> Reward:
    """HPSv2: cosine of image and text embeddings of open_clip ViT-H-14 with the HPSv2 checkpoint.

    ``checkpoint`` is the HPSv2 file (a local path, or the default ``hf-hub:`` location); ``None`` leaves
    random weights. Images are preprocessed as HPSv2's scorer does (open_clip ``image_transform`` with
    ``resize_longest_max=True``): long side to 224, black padding to a square.
    """
    backbone = build_clip("open_clip", model_name, checkpoint=checkpoint, model_config=model_config, dtype=dtype)
    backbone.resize = "longest"
    return ClipSimilarity(backbone, device)


@register("pickscore")
def pickscore(
    *,
    model_name: str = PICKSCORE_MODEL,
    checkpoint: str | None = None,
    model_config: Mapping | None = None,
    device: str | None = None,
    dtype: str = "float32",
) -> Reward:
    """PickScore: exp(logit_scale) * cosine, on a transformers CLIPModel (hub id or local directory)."""
    backbone = build_clip(
        "transformers", model_name, checkpoint=checkpoint, model_config=model_config, dtype=dtype
    )
    return ClipSimilarity(backbone, device, logit_scaled=True)
