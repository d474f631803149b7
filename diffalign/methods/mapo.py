"""MaPO (Hong et al., 2024): margin-aware preference optimisation without a reference model."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from diffalign import losses
from diffalign.data.batches import pair_latents
from diffalign.methods.base import Method
from diffalign.methods.dpo import noise_pairs, pair_errors
from diffalign.models.base import DiffusionModel
from diffalign.options import opt


@dataclass
class MaPO(Method):
    name: str = opt("mapo", "method name")
    beta: float = opt(0.1, "beta_mapo: weight of the log-odds margin term against the SFT term on winners "
                           "(published SDXL recipe: 0.1)", ge=0)

    needs_reference = False
    data = "pairs"

    def loss(self, model: DiffusionModel, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        x0, cond = pair_latents(model, batch)
        pn = noise_pairs(model, x0)
        err_w, err_l = pair_errors(model, pn, cond)     # one UNet call on [winners; losers]; no reference
        return losses.mapo(err_w, err_l, self.beta, num_timesteps=model.schedule.num_train_timesteps)
