"""GRPO for diffusion and flow models (Flow-GRPO, Liu et al. 2025; DanceGRPO, Xue et al. 2025; DDPO's settings).

Per optimizer step: sample G images for each prompt with the schedule's stochastic step, recording each step's
log-probability (``sampling.rollout``); score them with ANY reward (differentiable or not); normalise the
rewards within each prompt's group into advantages; then recompute the log-probability of a subset of the
recorded steps under the current weights, with gradient, and minimise PPO's clipped objective, optionally plus
a KL term to the reference (adapters disabled). A group's G images are made on one process, so its statistics
never depend on the process count. One update per rollout batch: the importance ratio is 1 when the gradient
is taken (the clip is inactive), which is the plain policy gradient; several inner updates per rollout are not
implemented yet.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from diffalign import losses
from diffalign.methods.base import Method
from diffalign.models.base import DiffusionModel
from diffalign.options import opt
from diffalign.sampling import Trajectory, guidance_on, rollout, step_gaussian


@dataclass
class GRPO(Method):
    name: str = opt("grpo", "method name")
    reward: Any = opt("prompt_colour_match", "reward to maximise: a name from diffalign.rewards or a mapping "
                                             "{name: ..., option: value}; it need not be differentiable")
    group_size: int = opt(8, "G: images sampled per prompt; advantages are normalised within each group "
                             "(Flow-GRPO's SD3.5 runs use 24)", ge=2)
    num_steps: int = opt(10, "sampler steps per rollout (Flow-GRPO trains with 10)", ge=1)
    guidance_scale: float = opt(4.5, "classifier-free guidance while sampling and in the update (Flow-GRPO's "
                                     "SD3.5: 4.5; DDPO: 5.0)", ge=0)
    eta: float = opt(1.0, "noise of the stochastic step: DDIM's eta on VP models (DDPO: 1.0), Flow-GRPO's noise "
                          "level a on flow models (0.7 for SD3, 0.9 for FLUX)", gt=0)
    timestep_fraction: float = opt(1.0, "share of the trajectory's steps trained on per update, drawn at random "
                                        "(Flow-GRPO: 0.99, DanceGRPO on FLUX: 0.6)", gt=0, le=1)
    clip_range: float = opt(1e-4, "PPO clip range of the importance ratio (DDPO and Flow-GRPO: 1e-4)", gt=0)
    adv_clip_max: float = opt(5.0, "advantages are clipped to [-max, max] (DDPO: 5)", gt=0)
    kl_beta: float = opt(0.0, "weight of the KL to the reference, mean((mean - mean_ref)^2 / (2 std^2)) per step "
                              "(Flow-GRPO: 0.04 for GenEval/OCR, 0.01 for PickScore; 0 = none)", ge=0)

    data = "prompts"
    many_grad_calls = True     # one denoiser call with gradient per trained step: the trainer syncs gradients

    def __post_init__(self) -> None:
        self._reward: Any = None

    @property
    def needs_reference(self) -> bool:    # a frozen copy for full fine-tuning only when the KL term is on
        return self.kl_beta > 0

    @property
    def reward_fn(self) -> Any:
        if self._reward is None:
            from diffalign.rewards import reward_from_config

            self._reward = reward_from_config(self.reward)
        return self._reward

    def sample(self, model: DiffusionModel, prompts: list[str], size: tuple[int, int]) -> tuple[Trajectory, Any]:
        """Rollouts of G images per prompt (group by group) and their conditioning."""
        expanded = [p for p in prompts for _ in range(self.group_size)]
        cond = model.sampling_cond(expanded, size)
        uncond = model.null_cond(len(expanded), size) if guidance_on(self.guidance_scale, model) else None
        latents = torch.randn(model.latent_shape(len(expanded), size), device=model.device)
        traj = rollout(model, latents, cond, self.num_steps, self.guidance_scale, uncond, self.eta)
        return traj, (expanded, cond, uncond)

    def loss(self, model: DiffusionModel, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        traj, (prompts, cond, uncond) = self.sample(model, batch["prompts"], batch["size"])
        with torch.no_grad():
            rewards = self.reward_fn(model.decode_latents(traj.final), prompts).float()
        advantages = losses.group_advantages(rewards, self.group_size).clamp(-self.adv_clip_max, self.adv_clip_max)
        trained = [k for k, noisy in enumerate(traj.stochastic) if noisy]
        trained = sorted(random.sample(trained, max(1, math.ceil(self.timestep_fraction * len(trained)))))
        total = torch.zeros((), device=traj.final.device)
        logged: dict[str, Tensor] = {}
        for k in trained:
            logp, mean, std = checkpoint(step_gaussian, model, traj, k, cond, uncond, self.guidance_scale,
                                         use_reentrant=False)
            step_loss, metrics = losses.clipped_policy_loss(logp, traj.log_probs[k].to(logp.device),
                                                            advantages.to(logp.device), self.clip_range)
            if self.kl_beta > 0:
                kl = self.kl_to_reference(model, traj, k, cond, uncond, mean, std)
                step_loss = step_loss + self.kl_beta * kl
                metrics["kl"] = kl.detach()
            total = total + step_loss / len(trained)
            for key, value in metrics.items():
                logged[key] = logged.get(key, 0) + value / len(trained)
        return total, {"loss": total.detach(), "reward": rewards.mean(), "reward_std": rewards.std(),
                       "advantage_abs": advantages.abs().mean(), **logged}

    def kl_to_reference(self, model: DiffusionModel, traj: Trajectory, k: int, cond: Any, uncond: Any,
                        mean: Tensor, std: Tensor) -> Tensor:
        """Flow-GRPO's KL between the policy's Gaussian step (``mean``, ``std``) and the reference's at step k."""
        with model.reference():
            ref_mean = step_gaussian(model, traj, k, cond, uncond, self.guidance_scale)[1]
        return ((mean - ref_mean) ** 2 / (2 * std**2)).flatten(1).mean(1).mean()
