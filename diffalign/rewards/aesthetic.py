"""LAION improved aesthetic predictor: an MLP on the L2-normalised CLIP ViT-L/14 image embedding.

The MLP keeps the published layer layout (``layers.0`` ... ``layers.7``, no activations) so the released
``sac+logos+ava1-l14-linearMSE.pth`` state dict loads as is.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from diffalign.rewards.backbone import ClipBackbone, ModelReward, build_clip, load_weights
from diffalign.rewards.base import Reward, register
from diffalign.rewards.clip import DEFAULT_CLIP


class AestheticMLP(nn.Module):
    """embedding [B,D] -> score [B]; the embedding is L2-normalised first, as the predictor was trained."""

    def __init__(self, embed_dim: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.layers(F.normalize(embedding, dim=-1)).squeeze(-1)


class AestheticModel(nn.Module):
    """CLIP image tower followed by the aesthetic MLP."""

    def __init__(self, clip: ClipBackbone, mlp: AestheticMLP) -> None:
        super().__init__()
        self.clip, self.mlp = clip, mlp

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.clip.image_features(images)  # [B,D] float32
        return self.mlp(features.to(self.mlp.layers[0].weight.dtype)).float()


class Aesthetic(ModelReward):
    """Prompt-independent aesthetic score (roughly 1-10 with the released weights)."""

    module: AestheticModel

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.module(images)


@register("aesthetic")
def aesthetic(
    *,
    mlp_checkpoint: str | None,
    backend: str = "transformers",
    model_name: str | None = None,
    pretrained: str | None = None,
    checkpoint: str | None = None,
    model_config: Mapping | None = None,
    device: str | None = None,
    dtype: str = "float32",
) -> Reward:
    """LAION aesthetic score; ``mlp_checkpoint`` is the predictor's state dict (``None``: random MLP).

    The CLIP options are those of ``clip_score`` (default OpenAI CLIP ViT-L/14 through transformers).
    """
    clip = build_clip(
        backend,
        model_name or DEFAULT_CLIP.get(backend, ""),
        pretrained=pretrained,
        checkpoint=checkpoint,
        model_config=model_config,
        dtype=dtype,
    )
    mlp = AestheticMLP(clip.embed_dim)
    if mlp_checkpoint is not None:
        load_weights(mlp, mlp_checkpoint)
    return Aesthetic(AestheticModel(clip, mlp.to(clip.logit_scale.dtype)), device)
