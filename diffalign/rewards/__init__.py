"""Reward functions for reward fine-tuning and evaluation, built by name.

Protocol: ``reward(images, prompts) -> scores`` with images a float tensor [B,3,H,W] in [0,1] (checked: anything
else, e.g. [-1,1] or CLIP-normalised pixels, is a ValueError), B prompts, and float32 scores [B]; each reward has
a ``differentiable`` flag. Differentiable rewards preprocess in torch only and keep their models frozen, so
gradients reach the images.

    reward = build_reward("target_colour", colour=[1.0, 0.0, 0.0])
    reward = reward_from_config({"name": "aesthetic", "mlp_checkpoint": "sac+logos+ava1-l14-linearMSE.pth"})

Registered names: brightness, saturation, target_colour, jpeg_compressibility, jpeg_incompressibility,
clip_score, hpsv2, pickscore, aesthetic, weighted_sum. open_clip and transformers are imported only when a
model-backed reward is built.
"""

from __future__ import annotations

from diffalign.rewards import aesthetic, clip, combine, pixel  # noqa: F401  (modules register their factories)
from diffalign.rewards.base import REWARDS, Reward, build_reward, check_images, register, reward_from_config

__all__ = ["REWARDS", "Reward", "build_reward", "check_images", "register", "reward_from_config"]
