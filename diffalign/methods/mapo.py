"""MaPO (Hong et al., 2024): margin-aware preference optimisation without a reference model."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from diffalign import losses
from diffalign.methods.base import Method
from diffalign.methods.dpo import pair_errors, seeded_pairs
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
        pn, cond = seeded_pairs(model, batch)
        err_w, err_l = pair_errors(model, pn, cond)     # one UNet call on [winners; losers]; no reference
        return losses.mapo(err_w, err_l, self.beta, num_timesteps=model.schedule.num_train_timesteps)
