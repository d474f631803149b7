"""AlignProp (Prabhudesai et al., 2023): maximise a differentiable reward by backpropagating through the sampler."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffalign.methods.base import Method
from diffalign.models.base import DiffusionModel
from diffalign.options import ConfigError, opt
from diffalign.sampling import guidance_on, sample


@dataclass
class AlignProp(Method):
    name: str = opt("alignprop", "method name")
    reward: Any = opt("aesthetic", "reward to maximise: a name from diffalign.rewards, or a mapping "
                                   "{name: ..., option: value} (e.g. {name: aesthetic, mlp_checkpoint: ...})")
    num_steps: int = opt(50, "DDIM sampler steps per trajectory", ge=1)
    grad_steps: int = opt(1, "K: only the last K sampler steps keep gradient (truncated backprop)",
                         ge=1)
    random_grad_steps: bool = opt(False, "draw K ~ Uniform{1..grad_steps} once per trajectory instead of fixing "
                                         "it (the paper's randomised truncation; K = 0 would carry no gradient)")
    guidance_scale: float = opt(7.5, "classifier-free guidance scale while sampling (1 disables it)", ge=0)
    eta: float = opt(1.0, "DDIM eta: 0 is deterministic, 1 has DDPM-like noise (the official code uses 1)", ge=0)
    reward_target: float | None = opt(None, "if set, loss = |reward - target| (e.g. aesthetic 10) instead of "
                                            "loss = -reward")

    needs_reference = False
    data = "prompts"
    many_grad_calls = True     # K denoiser calls with gradient per backward: the trainer syncs gradients itself

    def __post_init__(self) -> None:
        if not 1 <= self.grad_steps <= self.num_steps:
            raise ConfigError(f"method.grad_steps = {self.grad_steps} must be between 1 and method.num_steps "
                              f"({self.num_steps}): with K = 0 no gradient reaches the model")
        self._reward: Any = None

    @property
    def reward_fn(self) -> Any:
        """The reward, built on first use (heavy imports and weights stay out of config loading)."""
        if self._reward is None:
            from diffalign.rewards import reward_from_config

            self._reward = reward_from_config(self.reward)
            if not self._reward.differentiable:
                raise ConfigError(f"method.reward {self._reward.name!r} is not differentiable; AlignProp needs "
                                  "gradients of the reward (use it for relabelling or evaluation instead)")
        return self._reward

    def draw_grad_steps(self) -> int:
        return random.randint(1, self.grad_steps) if self.random_grad_steps else self.grad_steps

    def generate(self, model: DiffusionModel, prompts: list[str], size: tuple[int, int]) -> tuple[Tensor, int]:
        """Images [B,3,H,W] in [0,1] with gradient through the last K steps and the decoder; returns (images, K)."""
        n = len(prompts)
        cond = model.sampling_cond(prompts, size)
        uncond = model.null_cond(n, size) if guidance_on(self.guidance_scale, model) else None
        latents = torch.randn(model.latent_shape(n, size), device=model.device)
        k = self.draw_grad_steps()
        x0 = sample(model, latents, cond, self.num_steps, self.guidance_scale, uncond, self.eta, grad_steps=k)
        return model.decode_latents(x0), k

    def loss(self, model: DiffusionModel, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        images, k = self.generate(model, batch["prompts"], batch["size"])
        scores = self.reward_fn(images, batch["prompts"])                                   # [B]
        if self.reward_target is None:
            loss = -scores.mean()
        else:
            loss = (scores - self.reward_target).abs().mean()
        metrics = {"loss": loss.detach(), "reward": scores.mean().detach(), "reward_std": scores.std().detach()
                   if len(scores) > 1 else torch.zeros(()), "grad_steps": torch.tensor(float(k))}
        return loss, metrics
