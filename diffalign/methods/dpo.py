"""Diffusion-DPO (Wallace et al., 2023): DPO on the denoising error at a shared (t, noise) per pair."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from diffalign import losses
from diffalign.data.batches import pair_inputs, pair_latents
from diffalign.methods.base import Method
from diffalign.models.base import Cond, DiffusionModel
from diffalign.options import ConfigError, opt


@dataclass
class PairNoise:
    """One draw of (t, noise) shared by the winner and loser of each pair, with x_t and the target."""

    t: Tensor        # [2B] schedule levels, t[i] == t[i + B]
    x_t: Tensor      # [2B, ...] latents
    target: Tensor   # [2B, ...] what the denoiser should output


def noise_pairs(model: DiffusionModel, x0: Tensor) -> PairNoise:
    """Forward-noise x0 = [winners; losers] with the same t and the same noise for both halves."""
    b, schedule = x0.shape[0] // 2, model.schedule
    t = schedule.sample_t(b, x0.device).repeat(2)
    noise = torch.randn(x0[:b].shape, device=x0.device).repeat(2, *([1] * (x0.ndim - 1)))  # layout-independent draw
    return PairNoise(t=t, x_t=schedule.add_noise(x0, noise, t), target=schedule.target(x0, noise, t))


def seeded_pairs(model: DiffusionModel, batch: dict) -> tuple[PairNoise, Cond]:
    """The pairs' x0, t and noise drawn from each pair's own generator (``batch["seeds"]``, on the CPU): the same
    numbers whenever, wherever and in whatever batch a pair is drawn, which is what lets its reference errors be
    computed ahead of training. Per pair: the winner's and loser's latent samples, then t, then the noise."""
    mean, std, cond = pair_inputs(model, batch)
    b, schedule = mean.shape[0] // 2, model.schedule
    if batch["seeds"].numel() != b:
        raise ValueError(f"{batch['seeds'].numel()} seeds for {b} pairs")
    shape = mean.shape[1:]
    eps, ts, noise = [], [], []
    for seed in batch["seeds"].tolist():
        gen = torch.Generator().manual_seed(int(seed))
        eps.append(torch.randn((2, *shape), generator=gen))
        ts.append(schedule.sample_t(1, "cpu", generator=gen))
        noise.append(torch.randn(shape, generator=gen))
    eps = torch.stack(eps, dim=1).flatten(0, 1).to(mean.device)          # [winners; losers]
    x0 = mean.float() + std.float() * eps
    t = torch.cat(ts).to(mean.device).repeat(2)
    noise = torch.stack(noise).to(mean.device).repeat(2, *([1] * len(shape)))
    return PairNoise(t=t, x_t=schedule.add_noise(x0, noise, t), target=schedule.target(x0, noise, t)), cond


def pair_errors(model: DiffusionModel, pn: PairNoise, cond: Cond) -> tuple[Tensor, Tensor]:
    """Per-sample errors of the current predict() (policy, or reference inside model.reference())."""
    err = losses.per_sample_mse(model.predict(pn.x_t, pn.t, cond), pn.target)   # [2B]
    return err.chunk(2)


@dataclass
class DiffusionDPO(Method):
    name: str = opt("dpo", "method name")
    beta: float = opt(5000.0, "KL strength beta in the official -0.5*beta convention (5000 for SD1.5/SDXL "
                              "in the official code; the paper's SD1.5 runs use 2000)", gt=0)
    reference: str = opt("online", "online: the reference's errors are computed each step (adapters disabled, or "
                                   "a frozen copy); precomputed: read from the latent cache (`diffalign cache` "
                                   "with data.reference_epochs), so no reference forward and no frozen copy, with "
                                   "each pair's draws from its own seed", choices=("online", "precomputed"))

    data = "pairs"

    @property
    def needs_reference(self) -> bool:
        return self.reference == "online"

    def loss(self, model: DiffusionModel, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        if self.reference == "precomputed":
            if "ref_errors" not in batch:
                raise ConfigError("method.reference=precomputed reads the reference's errors from the latent cache: "
                                  "set data.cache_dir and build them with `diffalign cache CONFIG "
                                  "data.reference_epochs=E`")
            pn, cond = seeded_pairs(model, batch)
            err_w, err_l = pair_errors(model, pn, cond)
            ref = batch["ref_errors"].to(err_w.device).float()
            return losses.diffusion_dpo(err_w, err_l, ref[:, 0], ref[:, 1], self.beta)
        x0, cond = pair_latents(model, batch)
        pn = noise_pairs(model, x0)
        err_w, err_l = pair_errors(model, pn, cond)
        with model.reference():
            ref_err_w, ref_err_l = pair_errors(model, pn, cond)
        return losses.diffusion_dpo(err_w, err_l, ref_err_w, ref_err_l, self.beta)
