"""DiffusionNFT (Zheng et al. 2025): online reinforcement on the forward process, for any reward.

No log-probabilities and no stochastic sampler: rollouts are drawn with the ordinary deterministic sampler and
only their clean latents are kept; training noises them again, as supervised fine-tuning does, and pulls the
model toward the samples with high reward and away from those with low reward through two implicit policies
(``losses.diffusion_nft``).

Per rollout batch (``prepare``, no gradient): sample G images per prompt (CFG-free by default, as published),
score them with ANY reward, and turn the rewards into advantages and optimality probabilities r. Then, for each
image, a random ``timestep_fraction`` of the sampler's levels is trained on, in random order, each with fresh
noise: x_t is made and the old policy's x0 at (x_t, t) is computed here, with the weights that sampled.
``loss_parts`` then yields one term per trained level: the current policy's prediction at the same (x_t, t),
with gradient, in the NFT loss, plus ``kl_beta`` times the mean squared distance of the prediction from the
reference's (adapters disabled), as the official trainer adds it.

The old policy is the one that sampled the rollouts (the official code's ``decay_type 0``: its "old" adapter is
reset to the current weights after every rollout's update). The official SD3.5 recipes keep the old adapter as an
EMA of the policy instead (``decay_type`` 1 or 2: decay rising to 0.5 or 0.999), and sample with a second-order
solver (``dpm2``); neither is implemented here.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffalign import losses
from diffalign.methods.base import Method
from diffalign.methods.grpo import RewardGroups
from diffalign.models.base import DiffusionModel
from diffalign.options import opt
from diffalign.sampling import GroupNoise, sample


@dataclass
class DiffusionNFT(RewardGroups, Method):
    name: str = opt("nft", "method name")
    reward: Any = opt("prompt_colour_match", "reward to maximise: a name from diffalign.rewards or a mapping "
                                             "{name: ..., option: value}; it need not be differentiable")
    group_size: int = opt(8, "G: images sampled per prompt (official SD3.5 recipes: 24)", ge=2)
    num_steps: int = opt(10, "deterministic sampler steps per rollout; their levels are the trained timesteps "
                             "(official: 10)", ge=1)
    guidance_scale: float = opt(1.0, "classifier-free guidance while sampling (official: 1.0, CFG-free); the "
                                     "update always uses the conditional prediction", ge=0)
    beta: float = opt(1.0, "beta: how far the implicit positive and negative policies move from the old one "
                           "(official: 1.0; 0.1 for OCR and multi-reward)", gt=0)
    advantages: str = opt("group_batch_std", "group: (reward - group mean) / (group std + 1e-4); group_batch_std: "
                                             "the group's mean and the global batch's std (the official default)",
                          choices=("group", "group_batch_std"))
    adv_clip_max: float = opt(5.0, "advantages are clipped to [-max, max] before r = A / max / 2 + 1/2; the loss "
                                   "is scaled by max (official: 5)", gt=0)
    timestep_fraction: float = opt(0.99, "share of the sampler's levels each image is trained on: "
                                         "max(1, floor(num_steps * fraction)) of them, drawn per image in random "
                                         "order (official: 0.99, so 9 of 10)", gt=0, le=1)
    kl_beta: float = opt(1e-4, "weight of mean((prediction - reference prediction)^2), the reference being the "
                               "base model (official: 1e-4; 0 = none, which also saves a denoiser forward per "
                               "trained level)", ge=0)
    minibatches: int = opt(1, "M: rollouts for M optimizer steps are sampled first, then each step trains on its "
                              "share, all against the old policy that sampled them (official OCR recipe: 2)", ge=1)

    data = "prompts"
    many_grad_calls = True     # one denoiser call with gradient per trained level: the trainer syncs gradients

    @property
    def needs_reference(self) -> bool:
        return self.kl_beta > 0

    @property
    def trained_levels(self) -> int:
        return max(1, int(self.num_steps * self.timestep_fraction))

    # ------------------------------------------------------------------------------ rollout phase
    @torch.no_grad()
    def prepare(self, model: DiffusionModel, batch: dict) -> dict:
        """Rollouts, rewards and r; then each image's trained levels, noised latents and the old policy's x0."""
        batch = dict(batch)
        prompts = self.expanded(batch["prompts"])
        cond, uncond = self.conditioning(model, batch)
        seeds = batch["seeds"].tolist() if "seeds" in batch else [random.getrandbits(62) for _ in batch["prompts"]]
        noise = GroupNoise(seeds, self.group_size, model.device)
        shape = model.latent_shape(len(prompts), batch["size"])
        x0 = sample(model, noise.randn(shape), cond, self.num_steps, self.guidance_scale, uncond)
        metadata = self.expanded(batch.get("metadata") or [{} for _ in batch["prompts"]])
        rewards, info = self.reward_fn.details(model.decode_latents(x0), prompts, metadata)
        advantages = self.advantages_of(rewards.float(), batch).clamp(-self.adv_clip_max, self.adv_clip_max)
        levels = torch.tensor([float(t) for t, _ in model.sampling_steps(self.num_steps, x0.shape)])
        order = torch.stack([torch.randperm(len(levels), generator=g)[:self.trained_levels]
                             for g in _row_generators(noise)])                                  # [B, n]
        t = levels[order].T.contiguous().to(x0.device)                                            # [n, B]
        x_t = torch.stack([model.schedule.add_noise(x0, noise.randn(shape).to(x0.device), t_j) for t_j in t])
        x0_old = torch.stack([model.schedule.to_x0(model.predict(x_t[j], t[j], cond).float(), x_t[j], t[j])
                              for j in range(len(t))])
        batch["nft"] = {"x0": x0, "t": t, "x_t": x_t, "x0_old": x0_old, "rewards": rewards.float(),
                        "r": losses.nft_optimality(advantages, self.adv_clip_max),
                        "advantages": advantages, "info": {k: v.float().mean() for k, v in info.items()}}
        return batch

    # ------------------------------------------------------------------------------ update phase
    def loss_parts(self, model: DiffusionModel, batch: dict) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        """One term per trained level, each over the level count; the trainer backpropagates each before the
        next is made."""
        if "nft" not in batch:              # called directly, not through the trainer
            batch = self.prepare(model, batch)
        saved = batch["nft"]
        cond, _ = self.conditioning(model, batch)
        n = len(saved["t"])
        once = self.rollout_metrics(saved)
        for j in range(n):
            x_t, t = saved["x_t"][j], saved["t"][j]
            pred = model.predict(x_t, t, cond)
            x0_policy = model.schedule.to_x0(pred.float(), x_t, t)
            term, metrics = losses.diffusion_nft(x0_policy, saved["x0_old"][j], saved["x0"], saved["r"], self.beta,
                                                 self.adv_clip_max)
            if self.kl_beta > 0:
                with model.reference():
                    reference = model.predict(x_t, t, cond)
                kl = losses.per_sample_mse(pred, reference).mean()
                term = term + self.kl_beta * kl
                metrics["kl"] = kl.detach()
            part = term / n
            metrics = {key: value / n for key, value in metrics.items()}
            yield part, {**metrics, "loss": part.detach(), **(once if j == 0 else {})}


def _row_generators(noise: GroupNoise) -> Iterator[torch.Generator]:
    """One CPU generator per image, seeded from its group's noise generator: each image's trained levels depend
    on its example's seed only."""
    for g in noise.generators:
        for _ in range(noise.group_size):
            yield torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=g, device=g.device)))
