"""DDIM-InPO (Lu et al., CVPR 2025): Diffusion-DPO on latents reached by inverting the data (DDIM inversion on
VP models, ODE inversion of the flow on flow-matching ones)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from torch import Tensor

from diffalign import losses
from diffalign.data.batches import pair_inputs
from diffalign.methods.base import Method
from diffalign.methods.dpo import PairNoise, pair_errors
from diffalign.methods.draws import PairDraws
from diffalign.models.base import Cond, DiffusionModel
from diffalign.options import opt
from diffalign.sampling import invert


@dataclass
class DDIMInPO(Method):
    name: str = opt("inpo", "method name")
    beta: float = opt(5000.0, "KL strength beta in the official -0.5*beta convention (published: 2000 for SD1.5, "
                              "5000 for SDXL)", gt=0)
    inversion_steps: int = opt(10, "DDIM inversion grid: moves on k*T/inversion_steps below t, then to t "
                                   "(published: 10)", ge=1)
    inversion_model: str = opt("policy", "denoiser that inverts x0: the current policy (as published) or the "
                                         "frozen reference", choices=("policy", "reference"))
    inversion_eta: float = opt(0.1, "extra noise per inversion move, times the schedule's noise for the "
                                    "interval (DDIM posterior std; published: 0.1; 0 = deterministic)", ge=0)

    needs_reference = True
    data = "pairs"

    def invert(self, model: DiffusionModel, x0: Tensor, cond: Cond, draws: PairDraws | None = None) -> PairNoise:
        """x_t by inverting [winners; losers] up to a t shared within each pair; the target is built from the
        noise eps~ that maps x0 to the inverted x_t (the paper's reparameterised DPO target). t and the
        inversion's noise come from each pair's generator (``draws``; fresh ones when not given)."""
        schedule = model.schedule
        draws = draws or PairDraws.of({}, x0.shape[0] // 2, x0.device)
        t = draws.levels(schedule)
        use_reference = model.reference() if self.inversion_model == "reference" else contextlib.nullcontext()
        with use_reference:
            x_t = invert(model, x0, t, cond, self.inversion_steps, self.inversion_eta, draw=draws.each)
        eps = schedule.noise_from_xt(x_t, x0, t)
        return PairNoise(t=t, x_t=x_t, target=schedule.target(x0, eps, t))

    def loss(self, model: DiffusionModel, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        mean, std, cond = pair_inputs(model, batch)
        draws = PairDraws.of(batch, mean.shape[0] // 2, mean.device)
        x0 = mean.float() + std.float() * draws.each(mean.shape[1:])     # then t and the inversion's noise
        pn = self.invert(model, x0, cond, draws)
        err_w, err_l = pair_errors(model, pn, cond)
        with model.reference():
            ref_err_w, ref_err_l = pair_errors(model, pn, cond)
        return losses.diffusion_dpo(err_w, err_l, ref_err_w, ref_err_l, self.beta)
