"""AlignProp (Prabhudesai et al., 2023): maximise a differentiable reward by backpropagating through the sampler.

Only the last K sampler steps keep gradient. K is fixed, or drawn once per trajectory: uniformly in 1..grad_steps
(the paper's randomised truncation), or as the official trainer does it (mihirp1998/AlignProp, ``sd_pipeline.py``
with ``backprop_strategy="gaussian"``): a cut c = int(Normal(cut_mean, cut_std)), redrawn until 1 <= c < the
number of steps, detaches the steps before c, so K = num_steps - c (about 8 of 50 with mean 42, std 5). The loss
is multiplied by ``loss_coeff`` before the backward pass (the official 0.01), which matters for the gradient
clip: the clip acts on the scaled gradient.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffalign.methods.base import Method
from diffalign.models.base import DiffusionModel
from diffalign.options import ConfigError, opt
from diffalign.sampling import GroupNoise, guidance_on, randn, sample


@dataclass
class AlignProp(Method):
    name: str = opt("alignprop", "method name")
    reward: Any = opt("aesthetic", "reward to maximise: a name from diffalign.rewards, or a mapping "
                                   "{name: ..., option: value} (e.g. {name: aesthetic, mlp_checkpoint: ...})")
    num_steps: int = opt(50, "DDIM sampler steps per trajectory", ge=1)
    grad_steps: int = opt(1, "K: only the last K sampler steps keep gradient (truncated backprop)",
                         ge=1)
    truncation: str = opt("fixed", "how K is chosen per trajectory: fixed (K = grad_steps), uniform (K ~ "
                                   "Uniform{1..grad_steps}, the paper's) or gaussian (the official trainer's: the "
                                   "steps before a cut c ~ int(Normal(cut_mean, cut_std)) are detached, "
                                   "K = num_steps - c; grad_steps is then unused)",
                          choices=("fixed", "uniform", "gaussian"))
    cut_mean: float = opt(42.0, "truncation=gaussian: mean of the cut step c (official: 42 of 50 steps)")
    cut_std: float = opt(5.0, "truncation=gaussian: standard deviation of the cut (official: 5)", gt=0)
    loss_coeff: float = opt(0.01, "the loss is multiplied by this before backward, so train.max_grad_norm clips "
                                  "the scaled gradient (official: 0.01 with a clip of 1.0)", gt=0)
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
        if self.truncation == "gaussian" and not 1 <= self.cut_mean < self.num_steps:
            raise ConfigError(f"method.cut_mean = {self.cut_mean:g} must lie in [1, method.num_steps = "
                              f"{self.num_steps}): the cut is a sampler step (official: 42 of 50)")
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

    def draw_grad_steps(self, rng: random.Random | None = None) -> int:
        """K for one batch, from ``rng`` (the trainer's ``batch_seed``: the same K on every process, which a
        sharded denoiser needs, since each gradient step is a collective there)."""
        rng = rng or random.Random(random.getrandbits(64))
        if self.truncation == "uniform":
            return rng.randint(1, self.grad_steps)
        if self.truncation == "gaussian":
            if self.num_steps < 2:
                return 1
            cut = 0
            while not 1 <= cut < self.num_steps:
                cut = int(rng.gauss(self.cut_mean, self.cut_std))
            return self.num_steps - cut
        return self.grad_steps

    def generate(self, model: DiffusionModel, prompts: list[str], size: tuple[int, int],
                 batch_seed: int | None = None, seeds: list[int] | None = None) -> tuple[Tensor, int]:
        """Images [B,3,H,W] in [0,1] with gradient through the last K steps and the decoder; returns (images, K).
        With ``seeds`` (one per prompt) each image's initial noise and eta noise come from its own generator, so
        an image is the same whatever process or batch position it is sampled in; without, from torch's."""
        n = len(prompts)
        cond = model.sampling_cond(prompts, size)
        uncond = model.null_cond(n, size) if guidance_on(self.guidance_scale, model) else None
        noise = GroupNoise(seeds, 1, model.device) if seeds is not None else None
        latents = randn(model.latent_shape(n, size), noise, model.device)
        k = self.draw_grad_steps(None if batch_seed is None else random.Random(batch_seed))
        x0 = sample(model, latents, cond, self.num_steps, self.guidance_scale, uncond, self.eta, grad_steps=k,
                    generator=noise)
        return model.decode_latents(x0), k

    def loss(self, model: DiffusionModel, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        seeds = batch["seeds"].tolist() if "seeds" in batch else None
        images, k = self.generate(model, batch["prompts"], batch["size"], batch.get("batch_seed"), seeds)
        scores = self.reward_fn(images, batch["prompts"])                                   # [B]
        if self.reward_target is None:
            loss = -scores.mean()
        else:
            loss = (scores - self.reward_target).abs().mean()
        metrics = {"loss": loss.detach(), "reward": scores.mean().detach(), "reward_std": scores.std().detach()
                   if len(scores) > 1 else torch.zeros(()), "grad_steps": torch.tensor(float(k))}
        return self.loss_coeff * loss, metrics          # the logged loss is unscaled
