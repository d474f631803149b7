"""Diffusion-DPO (Wallace et al., 2023): DPO on the denoising error at a shared (t, noise) per pair."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from diffalign import losses
from diffalign.data.batches import pair_latents
from diffalign.methods.base import Method
from diffalign.models.base import Cond, DiffusionModel
from diffalign.options import opt


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


def pair_errors(model: DiffusionModel, pn: PairNoise, cond: Cond) -> tuple[Tensor, Tensor]:
    """Per-sample errors of the current predict() (policy, or reference inside model.reference())."""
    err = losses.per_sample_mse(model.predict(pn.x_t, pn.t, cond), pn.target)   # [2B]
    return err.chunk(2)


@dataclass
class DiffusionDPO(Method):
    name: str = opt("dpo", "method name")
    beta: float = opt(5000.0, "KL strength beta in the official -0.5*beta convention (5000 for SD1.5/SDXL "
                              "in the official code; the paper's SD1.5 runs use 2000)", gt=0)

    needs_reference = True
    data = "pairs"

    def loss(self, model: DiffusionModel, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        x0, cond = pair_latents(model, batch)
        pn = noise_pairs(model, x0)
        err_w, err_l = pair_errors(model, pn, cond)
        with model.reference():
            ref_err_w, ref_err_l = pair_errors(model, pn, cond)
        return losses.diffusion_dpo(err_w, err_l, ref_err_w, ref_err_l, self.beta)
