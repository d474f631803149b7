"""RAFT (Dong et al., 2023): reward-ranked fine-tuning on the model's own best samples.

Per optimizer step: sample G images for each prompt with the deterministic sampler, score them with any reward,
keep the top ``keep`` of each prompt's group, and train on those clean latents with the plain denoising loss of
the model's schedule (eps / v on VP models, velocity on flow models) at fresh (t, noise). The selected latents
are the sampler's own outputs, so nothing is VAE-encoded again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffalign import losses
from diffalign.methods.base import Method
from diffalign.models.base import DiffusionModel
from diffalign.options import ConfigError, opt
from diffalign.sampling import GroupNoise, guidance_on, sample


@dataclass
class RAFT(Method):
    name: str = opt("raft", "method name")
    reward: Any = opt("prompt_colour_match", "reward that ranks the samples (any reward, differentiable or not)")
    group_size: int = opt(4, "images sampled per prompt", ge=2)
    keep: int = opt(1, "best images of each prompt's group trained on", ge=1)
    num_steps: int = opt(20, "sampler steps per sample", ge=1)
    guidance_scale: float = opt(4.5, "classifier-free guidance while sampling", ge=0)

    data = "prompts"

    def __post_init__(self) -> None:
        if self.keep >= self.group_size:
            raise ConfigError(f"method.keep = {self.keep} must be below method.group_size = {self.group_size}: "
                              "RAFT trains on the best of each group")
        self._reward: Any = None

    @property
    def reward_fn(self) -> Any:
        if self._reward is None:
            from diffalign.rewards import reward_from_config

            self._reward = reward_from_config(self.reward)
        return self._reward

    @torch.no_grad()
    def best_samples(self, model: DiffusionModel, batch: dict) -> tuple[Tensor, Any, Tensor]:
        """(clean latents [P*keep, ...], their Cond, all rewards [P*G]) of the top ``keep`` per prompt."""
        prompts, size = batch["prompts"], batch["size"]
        expanded = [p for p in prompts for _ in range(self.group_size)]
        metadata = [m for m in batch.get("metadata") or [{} for _ in prompts] for _ in range(self.group_size)]
        cond = model.sampling_cond(expanded, size)
        uncond = model.null_cond(len(expanded), size) if guidance_on(self.guidance_scale, model) else None
        shape = model.latent_shape(len(expanded), size)
        if "seeds" in batch:             # each group's noise from its example's seed: layout-independent
            latents = GroupNoise(batch["seeds"].tolist(), self.group_size, model.device).randn(shape)
        else:
            latents = torch.randn(shape, device=model.device)
        x0 = sample(model, latents, cond, self.num_steps, self.guidance_scale, uncond)
        rewards = self.reward_fn(model.decode_latents(x0), expanded, metadata).float()
        top = rewards.view(-1, self.group_size).topk(self.keep, dim=1).indices             # [P, keep]
        chosen = (top + torch.arange(len(prompts), device=top.device)[:, None] * self.group_size).flatten()
        chosen = chosen.to(x0.device)
        return x0[chosen], cond.map(lambda v: v[chosen.to(v.device)]), rewards

    def loss(self, model: DiffusionModel, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        x0, cond, rewards = self.best_samples(model, batch)
        schedule = model.schedule
        t = schedule.sample_t(len(x0), x0.device)
        noise = torch.randn_like(x0)
        pred = model.predict(schedule.add_noise(x0, noise, t), t, cond)
        loss = losses.per_sample_mse(pred, schedule.target(x0, noise, t)).mean()
        kept = rewards.view(-1, self.group_size).topk(self.keep, dim=1).values
        return loss, {"loss": loss.detach(), "reward": rewards.mean(), "reward_kept": kept.mean()}
