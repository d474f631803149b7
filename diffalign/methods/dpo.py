"""Diffusion-DPO (Wallace et al., 2023): DPO on the denoising error at a shared (t, noise) per pair."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from diffalign import losses
from diffalign.data.batches import pair_inputs
from diffalign.methods.base import Method
from diffalign.methods.draws import PairDraws
from diffalign.models.base import Cond, DiffusionModel
from diffalign.options import ConfigError, opt


@dataclass
class PairNoise:
    """One draw of (t, noise) shared by the winner and loser of each pair, with x_t and the target."""

    t: Tensor        # [2B] schedule levels, t[i] == t[i + B]
    x_t: Tensor      # [2B, ...] latents
    target: Tensor   # [2B, ...] what the denoiser should output


def seeded_pairs(model: DiffusionModel, batch: dict) -> tuple[PairNoise, Cond]:
    """The pairs' x0, t and noise, each pair's from its own generator (:class:`PairDraws`, seeded by
    ``batch["seeds"]``): the same numbers whenever, wherever and in whatever batch a pair is drawn, which is what
    makes several processes train as one and lets reference errors be computed ahead of training. Per pair:
    the winner's and loser's latent samples, then t, then the noise they share."""
    mean, std, cond = pair_inputs(model, batch)
    b, schedule = mean.shape[0] // 2, model.schedule
    draws = PairDraws.of(batch, b, mean.device)
    x0 = mean.float() + std.float() * draws.each(mean.shape[1:])
    t = draws.levels(schedule)
    noise = draws.shared(mean.shape[1:])
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
                                   "with data.reference_epochs), so no reference forward and no frozen copy",
                         choices=("online", "precomputed"))

    data = "pairs"

    @property
    def needs_reference(self) -> bool:
        return self.reference == "online"

    def loss(self, model: DiffusionModel, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        if self.reference == "precomputed" and "ref_errors" not in batch:
            raise ConfigError("method.reference=precomputed reads the reference's errors from the latent cache: "
                              "set data.cache_dir and build them with `diffalign cache CONFIG "
                              "data.reference_epochs=E`")
        pn, cond = seeded_pairs(model, batch)
        err_w, err_l = pair_errors(model, pn, cond)
        if self.reference == "precomputed":
            ref = batch["ref_errors"].to(err_w.device).float()
            ref_err_w, ref_err_l = ref[:, 0], ref[:, 1]
        else:
            with model.reference():
                ref_err_w, ref_err_l = pair_errors(model, pn, cond)
        return losses.diffusion_dpo(err_w, err_l, ref_err_w, ref_err_l, self.beta)
