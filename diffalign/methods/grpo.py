"""GRPO for diffusion and flow models (Flow-GRPO, Liu et al. 2025; DanceGRPO, Xue et al. 2025; DDPO's settings).

Per rollout batch (``prepare``, no gradient): sample G images for each prompt with the schedule's stochastic
step, recording each step's log-probability (``sampling.rollout``); score them with ANY reward (differentiable
or not; it receives each prompt's metadata); turn the rewards into advantages. Then ``updates_per_rollout``
optimizer steps on those rollouts (``loss``): recompute the log-probability of a random subset of the recorded
steps under the current weights, with gradient, and minimise PPO's clipped objective, optionally plus a KL term
to the reference (adapters disabled). In the first update the ratio is 1 (the plain policy gradient); later ones
see the clip.

Advantages: within each prompt's group (GRPO), with the group's mean and the global batch's std (Flow-GRPO's SD3
configs), or DDPO's per-prompt running statistics. A group's G images are sampled on one process from noise
seeded by the example's seed, so rollouts and group advantages do not depend on the process count; the batch
std and the per-prompt statistics are taken over the gathered global batch.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffalign import losses
from diffalign.methods.base import Method
from diffalign.models.base import DiffusionModel
from diffalign.options import ConfigError, opt
from diffalign.sampling import GroupNoise, Trajectory, guidance_on, rollout, step_gaussian


def prompt_key(prompt: str) -> int:
    """A stable 56-bit integer for a prompt's text: statistics are kept per prompt text, as in ddpo-pytorch."""
    return int.from_bytes(hashlib.blake2b(prompt.encode("utf-8"), digest_size=7).digest(), "little")


class PromptStats:
    """DDPO's per-prompt stat tracker: the last ``buffer_size`` rewards of each prompt; a prompt's advantage uses
    them once it has ``min_count``, the whole batch's statistics before that (std epsilon 1e-6)."""

    def __init__(self, buffer_size: int, min_count: int) -> None:
        self.buffer_size, self.min_count = buffer_size, min_count
        self.seen: dict[int, deque] = {}

    def advantages(self, keys: Tensor, rewards: Tensor) -> Tensor:
        """Advantages [N] of rewards [N] whose prompts are ``keys`` [N], after adding them to the statistics."""
        keys, rewards = keys.cpu(), rewards.float().cpu()
        out = torch.empty_like(rewards)
        for key in keys.unique().tolist():              # sorted, as np.unique in ddpo-pytorch
            mine = keys == key
            seen = self.seen.setdefault(key, deque(maxlen=self.buffer_size))
            seen.extend(rewards[mine].tolist())
            ref = torch.tensor(list(seen)) if len(seen) >= self.min_count else rewards
            out[mine] = (rewards[mine] - ref.mean()) / (ref.std(unbiased=False) + 1e-6)
        return out

    def state_dict(self) -> dict:
        return {int(k): list(v) for k, v in self.seen.items()}

    def load_state_dict(self, state: dict) -> None:
        self.seen = {int(k): deque(v, maxlen=self.buffer_size) for k, v in state.items()}


class RewardGroups:
    """What the online methods that sample G images per prompt and score them share (GRPO, DiffusionNFT): the
    reward, the group layout, the rollout conditioning and the advantages. Subclasses are dataclasses with the
    fields ``reward``, ``group_size``, ``guidance_scale`` and ``advantages``."""

    reward: Any
    group_size: int
    guidance_scale: float
    advantages: str
    _reward: Any = None                        # the reward model, built on first use (reward_fn)
    stats: PromptStats | None = None          # advantages=per_prompt only

    @property
    def reward_fn(self) -> Any:
        if self._reward is None:
            from diffalign.rewards import reward_from_config

            self._reward = reward_from_config(self.reward)
        return self._reward

    def expanded(self, values: list) -> list:
        """Each prompt's entry repeated G times: the layout of a rollout batch, group by group."""
        return [v for v in values for _ in range(self.group_size)]

    def conditioning(self, model: DiffusionModel, batch: dict) -> tuple[Any, Any]:
        """(cond, uncond) of the batch's G-times repeated prompts, encoded once per rollout batch."""
        if "_cond" not in batch:
            prompts = self.expanded(batch["prompts"])
            cond = model.sampling_cond(prompts, batch["size"])
            uncond = model.null_cond(len(prompts), batch["size"]) if guidance_on(self.guidance_scale, model) else None
            batch["_cond"] = (cond, uncond)
        return batch["_cond"]

    @staticmethod
    def rollout_metrics(saved: dict) -> dict[str, Tensor]:
        """What a rollout batch logs once per update: its rewards, their spread, the advantages' size and the
        reward's own details."""
        rewards = saved["rewards"]
        return {"reward": rewards.mean(), "reward_std": rewards.std(unbiased=False),
                "advantage_abs": saved["advantages"].abs().mean(),
                **{f"reward_{k}": v for k, v in saved["info"].items()}}

    def loss(self, model: DiffusionModel, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        """The whole loss at once, the sum of ``loss_parts`` (every part's graph kept until backward): for
        direct calls and tests; the trainer backpropagates the parts one by one."""
        total, logged = None, {}
        for part, metrics in self.loss_parts(model, batch):
            total = part if total is None else total + part
            for key, value in metrics.items():
                logged[key] = logged.get(key, 0) + value
        return total, logged

    def advantages_of(self, rewards: Tensor, batch: dict) -> Tensor:
        if self.advantages == "group":
            return losses.group_advantages(rewards, self.group_size)
        everyone = self.gather(rewards)                     # the global batch, in rank order
        if self.advantages == "group_batch_std":
            grouped = rewards.view(-1, self.group_size)
            return ((grouped - grouped.mean(1, keepdim=True)) / (everyone.std(unbiased=False) + 1e-4)).flatten()
        keys = torch.tensor([prompt_key(p) for p in self.expanded(batch["prompts"])], device=rewards.device)
        advantages = self.stats.advantages(self.gather(keys), everyone).to(rewards.device)
        if "seeds" not in batch:
            return advantages
        seeds = batch["seeds"].to(rewards.device)
        mine = torch.isin(self.gather(seeds), seeds)        # this process's rows (seeds are unique in a run)
        return advantages[mine.repeat_interleave(self.group_size)]


@dataclass
class GRPO(RewardGroups, Method):
    name: str = opt("grpo", "method name")
    reward: Any = opt("prompt_colour_match", "reward to maximise: a name from diffalign.rewards or a mapping "
                                             "{name: ..., option: value}; it need not be differentiable")
    group_size: int = opt(8, "G: images sampled per prompt (Flow-GRPO's SD3.5 runs use 24, DanceGRPO 12-16; "
                             "DDPO samples each prompt once: 1 with advantages=per_prompt)", ge=1)
    num_steps: int = opt(10, "sampler steps per rollout (Flow-GRPO trains with 10)", ge=1)
    guidance_scale: float = opt(4.5, "classifier-free guidance while sampling and in the update (Flow-GRPO's "
                                     "SD3.5: 4.5; DDPO: 5.0)", ge=0)
    eta: float = opt(1.0, "noise of the stochastic step: DDIM's eta on VP models (DDPO: 1.0), Flow-GRPO's noise "
                          "level a on flow models (0.7 for SD3, 0.9 for FLUX)", gt=0)
    sde_window: int = opt(0, "MixGRPO: only this many consecutive steps are stochastic (and trained), the others "
                             "deterministic; the window starts at a random step each rollout (0 = all steps)", ge=0)
    same_initial_noise: bool = opt(False, "the G images of a prompt start from one noise (DanceGRPO)")
    advantages: str = opt("group", "group: (r - group mean) / (group std + 1e-4) (GRPO); group_batch_std: the "
                                   "group's mean and the global batch's std (Flow-GRPO's SD3 configs); per_prompt: "
                                   "DDPO's running per-prompt statistics",
                          choices=("group", "group_batch_std", "per_prompt"))
    stat_buffer: int = opt(16, "advantages=per_prompt: rewards kept per prompt (DDPO: 16)", ge=1)
    stat_min_count: int = opt(16, "advantages=per_prompt: rewards a prompt needs before its own statistics are "
                                  "used, the batch's before that (DDPO: 16)", ge=1)
    updates_per_rollout: int = opt(1, "optimizer steps on each rollout batch; after the first the importance "
                                      "ratio departs from 1 and the clip acts", ge=1)
    minibatches: int = opt(1, "M: rollouts for M optimizer steps are sampled first, then each step trains on its "
                              "share (train.batch_size x grad_accum prompts), so steps 2..M are off-policy as in "
                              "ddpo-pytorch (32 images sampled per process, 4 steps on 8 each: M = 4)", ge=1)
    timestep_fraction: float = opt(1.0, "share of the trajectory's stochastic steps trained on per update, drawn "
                                        "at random (Flow-GRPO: 0.99, DanceGRPO on FLUX: 0.6)", gt=0, le=1)
    per_sample_timesteps: bool = opt(False, "each image draws its own subset and order of the trained steps, as "
                                            "ddpo-pytorch permutes timesteps per sample; else one subset for the "
                                            "batch (Flow-GRPO)")
    clip_range: float = opt(1e-4, "PPO clip range of the importance ratio (DDPO and Flow-GRPO: 1e-4)", gt=0)
    adv_clip_max: float = opt(5.0, "advantages are clipped to [-max, max] (DDPO: 5)", gt=0)
    kl_beta: float = opt(0.0, "weight of the KL to the reference, mean((mean - mean_ref)^2 / (2 std^2)) per step "
                              "(Flow-GRPO: 0.04 for GenEval/OCR, 0.01 for PickScore; 0 = none)", ge=0)

    data = "prompts"
    many_grad_calls = True     # one denoiser call with gradient per trained step: the trainer syncs gradients

    def __post_init__(self) -> None:
        if self.group_size < 2 and self.advantages != "per_prompt":
            raise ConfigError(f"method.group_size = {self.group_size}: advantages={self.advantages} normalises "
                              "within groups, which needs at least 2 images per prompt")
        if self.sde_window > self.num_steps:
            raise ConfigError(f"method.sde_window = {self.sde_window} exceeds method.num_steps = {self.num_steps}")
        self.stats = PromptStats(self.stat_buffer, self.stat_min_count)

    @property
    def needs_reference(self) -> bool:    # a frozen copy for full fine-tuning only when the KL term is on
        return self.kl_beta > 0

    @property
    def updates_per_batch(self) -> int:
        return self.updates_per_rollout

    def state_dict(self) -> dict:
        return {"prompt_stats": self.stats.state_dict()} if self.advantages == "per_prompt" else {}

    def load_state_dict(self, state: dict) -> None:
        self.stats.load_state_dict(state.get("prompt_stats", {}))

    # ------------------------------------------------------------------------------ rollout phase
    def prepare(self, model: DiffusionModel, batch: dict) -> dict:
        """Rollouts of G images per prompt, their rewards and advantages (no gradient)."""
        batch = dict(batch)
        prompts = self.expanded(batch["prompts"])
        cond, uncond = self.conditioning(model, batch)
        seeds = batch["seeds"].tolist() if "seeds" in batch else [random.getrandbits(62) for _ in batch["prompts"]]
        noise = GroupNoise(seeds, self.group_size, model.device)
        latents = noise.randn(model.latent_shape(len(prompts), batch["size"]), shared=self.same_initial_noise)
        window = None
        if self.sde_window:
            first = random.randrange(self.num_steps - self.sde_window + 1)
            window = (first, first + self.sde_window)
        traj = rollout(model, latents, cond, self.num_steps, self.guidance_scale, uncond, self.eta, window, noise)
        metadata = self.expanded(batch.get("metadata") or [{} for _ in batch["prompts"]])
        rewards, info = self.reward_fn.details(model.decode_latents(traj.final), prompts, metadata)
        advantages = self.advantages_of(rewards.float(), batch).clamp(-self.adv_clip_max, self.adv_clip_max)
        batch["rollout"] = {**traj.to_dict(), "rewards": rewards.float(), "advantages": advantages,
                            "info": {k: v.float().mean() for k, v in info.items()}}
        return batch

    # ------------------------------------------------------------------------------ update phase
    def loss_parts(self, model: DiffusionModel, batch: dict) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        """One term per trained step: the clipped objective (and KL) of that step over the trained steps' count.
        The trainer backpropagates each term before the next is made, so one step's graph is alive at a time and
        nothing is recomputed (the memory of a checkpointed step, at the speed of an unchecked one)."""
        if "rollout" not in batch:          # called directly, not through the trainer
            batch = self.prepare(model, batch)
        saved = batch["rollout"]
        traj = Trajectory.from_dict(saved)
        cond, uncond = self.conditioning(model, batch)
        advantages = saved["advantages"]
        trained = self.trained_steps(traj)
        once = self.rollout_metrics(saved)
        for j, k in enumerate(trained):
            logp, mean, std = step_gaussian(model, traj, k, cond, uncond, self.guidance_scale)
            step_loss, metrics = losses.clipped_policy_loss(logp, traj.log_prob(k).to(logp.device),
                                                            advantages.to(logp.device), self.clip_range)
            if self.kl_beta > 0:
                kl = self.kl_to_reference(model, traj, k, cond, uncond, mean, std)
                step_loss = step_loss + self.kl_beta * kl
                metrics["kl"] = kl.detach()
            part = step_loss / len(trained)
            metrics = {key: value / len(trained) for key, value in metrics.items()}
            yield part, {"loss": part.detach(), **metrics, **(once if j == 0 else {})}

    def trained_steps(self, traj: Trajectory) -> list[int] | list[Tensor]:
        """The steps this update trains, in order: step indices shared by the batch, or with
        ``per_sample_timesteps`` one [B] tensor per term (term j trains image b on its j-th drawn step)."""
        noisy = [k for k, stochastic in enumerate(traj.stochastic) if stochastic]
        n = max(1, math.ceil(self.timestep_fraction * len(noisy)))
        if not self.per_sample_timesteps:
            return sorted(random.sample(noisy, n))
        pool = torch.tensor(noisy)
        order = torch.stack([pool[torch.randperm(len(noisy))[:n]] for _ in range(traj.latents.shape[1])])  # [B, n]
        return list(order.T)

    def kl_to_reference(self, model: DiffusionModel, traj: Trajectory, k: int, cond: Any, uncond: Any,
                        mean: Tensor, std: Tensor) -> Tensor:
        """Flow-GRPO's KL between the policy's Gaussian step (``mean``, ``std``) and the reference's at step k."""
        with model.reference():
            ref_mean = step_gaussian(model, traj, k, cond, uncond, self.guidance_scale)[1]
        return ((mean - ref_mean) ** 2 / (2 * std**2)).flatten(1).mean(1).mean()
