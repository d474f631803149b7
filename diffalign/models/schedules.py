"""Noise schedules: all the arithmetic that connects x0, noise and x_t, owned by the model family.

Methods, the sampler and the inversion ask a schedule; they never do ``alpha_bar`` or ``sigma`` algebra
themselves. A schedule works on **levels**: a tensor ``t`` [B] in the schedule's own units, passed around
opaquely by everyone else.

    VPSchedule    variance preserving (SD 1.x/2.x, SDXL): integer timesteps in [0, T), level -1 is the clean
                  latent (abar = 1); eps or v prediction; DDIM steps
    FlowSchedule  rectified flow (SD3/SD3.5, FLUX.1): levels are sigma in [0, 1], 0 is clean; velocity
                  prediction v = noise - x0; Euler steps; the model's timestep shift

The contract (both classes):

    num_train_timesteps              T (MaPO scales its margin by it)
    sample_t(n, device, generator)   training levels
    add_noise(x0, noise, t)          x_t
    target(x0, noise, t)             what the denoiser is trained to output
    noise_from_xt(x_t, x0, t)        the noise that maps x0 to x_t (InPO's target after inversion)
    to_x0 / to_eps(pred, x_t, t)     a prediction as a clean latent / as noise
    timestep(t) / level(timestep)    a level as the diffusers scheduler's timestep value, and back
    sampling_steps(num_steps, ...)   the sampler's (t, t_next) pairs, from the diffusers scheduler's own
                                     set_timesteps, so the grid and the last step are the pipeline's
    step(pred, x, t, t_next, eta, noise)          one sampler move (stochastic when eta > 0)
    step_logprob(pred, x, t, t_next, eta, noise)  the same move and the Gaussian log-probability of it
    logprob(pred, x, t, t_next, eta, x_next)      that log-probability for a move already taken
    step_mean_std(pred, x, t, t_next, eta)        the Gaussian of a stochastic step (for KL terms)
    inversion_levels(t, num_steps)   [B, S+1] levels from clean up to t
    invert_step(pred, x, t, t_next, eta, noise)   one inversion move towards more noise

All of it runs in fp32, whatever the denoiser's precision.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def _view(v: Tensor, ndim: int) -> Tensor:
    return v.float().reshape(-1, *([1] * (ndim - 1)))


def gaussian_logprob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """log N(x; mean, std^2), averaged over all but the batch axis (DDPO's and Flow-GRPO's convention)."""
    std = std.expand_as(mean) if std.ndim else std
    logp = -((x.float() - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return logp.flatten(1).mean(1)


class _Stochastic:
    """What both schedules share: a stochastic step is the Gaussian ``step_mean_std`` describes."""

    def step_mean_std(self, pred: Tensor, x: Tensor, t: Tensor, t_next: Tensor,
                       eta: float) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def step_logprob(self, pred: Tensor, x: Tensor, t: Tensor, t_next: Tensor, eta: float,
                     noise: Tensor) -> tuple[Tensor, Tensor]:
        """(x_next, log p(x_next | x)) of a stochastic step (eta > 0), as DDPO and Flow-GRPO compute it."""
        mean, std = self.step_mean_std(pred, x, t, t_next, eta)
        x_next = mean + std * noise.float()
        return x_next, gaussian_logprob(x_next, mean, std)

    def logprob(self, pred: Tensor, x: Tensor, t: Tensor, t_next: Tensor, eta: float, x_next: Tensor) -> Tensor:
        """log p(x_next | x) under the step this prediction defines: what a policy-gradient update recomputes, with
        gradient, for a step recorded in a rollout."""
        mean, std = self.step_mean_std(pred, x, t, t_next, eta)
        return gaussian_logprob(x_next, mean, std)


class VPSchedule(_Stochastic):
    """Variance-preserving diffusion with the diffusers DDPM/DDIM conventions."""

    kind = "vp"
    clean = -1

    def __init__(self, config: dict[str, Any]) -> None:
        from diffusers import DDIMScheduler

        self.config = dict(config)
        self._ddim = DDIMScheduler.from_config(self.config)
        self.alphas_cumprod = self._ddim.alphas_cumprod.to(torch.float32)
        self.num_train_timesteps: int = self._ddim.config.num_train_timesteps
        self.prediction_type: str = self._ddim.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type {self.prediction_type!r} is not supported")
        # the abar DDIM steps to after its last timestep: 1, or abar_0 (set_alpha_to_one=False, as in SD/SDXL)
        self.final_level = -1 if self._ddim.config.set_alpha_to_one else 0

    def use_timestep_sampling(self, name: str) -> None:
        if name != "uniform":
            raise ValueError(f"train.timestep_sampling={name} is for flow-matching models; variance-preserving "
                             "models draw t uniformly")

    def abar(self, t: Tensor, ndim: int = 4) -> Tensor:
        """abar at levels t (-1 -> 1), fp32, shaped [B,1,...] to broadcast against latents."""
        t = torch.as_tensor(t).long()
        table = self.alphas_cumprod.to(t.device)[t.clamp(min=0)]
        return _view(torch.where(t < 0, torch.ones_like(table), table), ndim)

    # ------------------------------------------------------------------------- training
    def sample_t(self, n: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> Tensor:
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator, device=device)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        a = self.abar(t, x0.ndim).to(x0.device)
        return a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """eps, or v = sqrt(abar) eps - sqrt(1 - abar) x0."""
        if self.prediction_type == "epsilon":
            return noise.float()
        a = self.abar(t, x0.ndim).to(x0.device)
        return a.sqrt() * noise.float() - (1 - a).sqrt() * x0.float()

    def noise_from_xt(self, x_t: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        a = self.abar(t, x0.ndim).to(x0.device)
        return (x_t.float() - a.sqrt() * x0.float()) / (1 - a).sqrt()

    def to_eps(self, pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        if self.prediction_type == "epsilon":
            return pred.float()
        a = self.abar(t, x_t.ndim).to(x_t.device)
        return a.sqrt() * pred.float() + (1 - a).sqrt() * x_t.float()

    def to_x0(self, pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        a = self.abar(t, x_t.ndim).to(x_t.device)
        if self.prediction_type == "epsilon":
            return (x_t.float() - (1 - a).sqrt() * pred.float()) / a.sqrt()
        return a.sqrt() * x_t.float() - (1 - a).sqrt() * pred.float()

    def timestep(self, t: Tensor) -> Tensor:
        """The integer timestep; the clean level -1 is shown to the denoiser as 0, the closest it knows."""
        return torch.as_tensor(t).long().clamp(min=0)

    def level(self, timestep: Tensor) -> Tensor:
        """The level of a diffusers scheduler timestep (the inverse of ``timestep``)."""
        return torch.as_tensor(timestep).long()

    # ------------------------------------------------------------------------- sampling
    def sampling_steps(self, num_steps: int, image_seq_len: int | None = None) -> list[tuple[int, int]]:
        """(t, t_next) per step: DDIMScheduler's timesteps for this config, each stepping to t - T // num_steps
        as DDIMScheduler.step does (the final alpha below 0: 1, or abar_0 when set_alpha_to_one is false)."""
        self._ddim.set_timesteps(num_steps)
        ratio = self.num_train_timesteps // num_steps
        return [(int(t), int(t) - ratio if int(t) - ratio >= 0 else self.final_level) for t in self._ddim.timesteps]

    def _move(self, eps: Tensor, x0_hat: Tensor, a_to: Tensor, std: Tensor) -> Tensor:
        return a_to.sqrt() * x0_hat + (1 - a_to - std**2).clamp(min=0).sqrt() * eps

    def posterior_std(self, t: Tensor, t_next: Tensor, ndim: int = 4) -> Tensor:
        """DDIM's eta = 1 std between two levels: sqrt((1-a_lo)/(1-a_hi) (1 - a_hi/a_lo)); 0 at a clean end."""
        a_from, a_to = self.abar(t, ndim), self.abar(t_next, ndim)
        a_lo, a_hi = torch.maximum(a_from, a_to), torch.minimum(a_from, a_to)
        var = (1 - a_lo) / (1 - a_hi).clamp(min=1e-12) * (1 - a_hi / a_lo)
        return var.clamp(min=0).sqrt()

    def step_mean_std(self, pred: Tensor, x: Tensor, t: Tensor, t_next: Tensor, eta: float) -> tuple[Tensor, Tensor]:
        t, t_next = torch.as_tensor(t, device=x.device), torch.as_tensor(t_next, device=x.device)
        eps, x0_hat = self.to_eps(pred, x, self.timestep(t)), self.to_x0(pred, x, t)   # pred was made at timestep(t)
        std = eta * self.posterior_std(t, t_next, x.ndim).to(x.device)
        return self._move(eps, x0_hat, self.abar(t_next, x.ndim).to(x.device), std), std

    def step(self, pred: Tensor, x: Tensor, t: Tensor, t_next: Tensor, eta: float = 0.0,
             noise: Tensor | None = None) -> Tensor:
        """One DDIM step from level t to t_next < t (DDIMScheduler.step with this eta and variance noise)."""
        mean, std = self.step_mean_std(pred, x, t, t_next, eta)
        return mean if noise is None or eta == 0 else mean + std * noise.float()

    # ------------------------------------------------------------------------- inversion
    def inversion_levels(self, t: Tensor, num_steps: int) -> Tensor:
        """t [N] -> [N, S+1]: clean, the grid points k*T/num_steps strictly below t, then t; padded with t."""
        grid = torch.arange(1, num_steps, device=t.device, dtype=t.dtype) * self.num_train_timesteps // num_steps
        return _grid_levels(t, grid, torch.full((len(t), 1), self.clean, device=t.device, dtype=t.dtype))

    def invert_step(self, pred: Tensor, x: Tensor, t: Tensor, t_next: Tensor, eta: float = 0.0,
                    noise: Tensor | None = None) -> Tensor:
        """One DDIM move up from t to t_next > t; with eta, plus eta times the DDIM std of the interval."""
        return self.step(pred, x, t, t_next, eta, noise)


class FlowSchedule(_Stochastic):
    """Rectified flow as in diffusers' FlowMatchEulerDiscreteScheduler: x_t = (1 - s) x0 + s noise, v = noise - x0."""

    kind = "flow"
    clean = 0.0
    prediction_type = "flow"

    def __init__(self, config: dict[str, Any], timestep_sampling: str = "uniform") -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.config = dict(config)
        self._euler = FlowMatchEulerDiscreteScheduler.from_config(self.config)
        self.num_train_timesteps: int = self._euler.config.num_train_timesteps
        self.table = self._euler.sigmas.to(torch.float32)             # the (statically shifted) training sigmas
        self.timestep_sampling = timestep_sampling

    def use_timestep_sampling(self, name: str) -> None:
        if name not in ("uniform", "logit_normal", "mode"):
            raise ValueError(f"unknown timestep sampling {name!r}")
        self.timestep_sampling = name

    # ------------------------------------------------------------------------- training
    def sample_t(self, n: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> Tensor:
        """sigma from the training table at index floor(u * T): u uniform, logit-normal(0, 1) or 'mode' (1.29),
        as diffusers' compute_density_for_timestep_sampling draws it."""
        if self.timestep_sampling == "logit_normal":
            u = torch.sigmoid(torch.randn(n, generator=generator))
        elif self.timestep_sampling == "mode":
            u = torch.rand(n, generator=generator)
            u = 1 - u - 1.29 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        else:
            u = torch.rand(n, generator=generator)
        index = (u * self.num_train_timesteps).long().clamp(max=self.num_train_timesteps - 1)
        return self.table[index].to(device)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        s = _view(torch.as_tensor(t), x0.ndim).to(x0.device)
        return (1 - s) * x0.float() + s * noise.float()

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return noise.float() - x0.float()

    def noise_from_xt(self, x_t: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        s = _view(torch.as_tensor(t), x0.ndim).to(x0.device)
        return (x_t.float() - (1 - s) * x0.float()) / s

    def to_x0(self, pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        s = _view(torch.as_tensor(t), x_t.ndim).to(x_t.device)
        return x_t.float() - s * pred.float()

    def to_eps(self, pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        s = _view(torch.as_tensor(t), x_t.ndim).to(x_t.device)
        return x_t.float() + (1 - s) * pred.float()

    def timestep(self, t: Tensor) -> Tensor:
        return torch.as_tensor(t).float() * self.num_train_timesteps

    def level(self, timestep: Tensor) -> Tensor:
        return torch.as_tensor(timestep).float() / self.num_train_timesteps

    # ------------------------------------------------------------------------- sampling
    def mu(self, image_seq_len: int) -> float:
        """FLUX.1-dev's resolution-dependent shift: linear in the packed image sequence length."""
        c = self._euler.config
        slope = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
        return c.base_shift + slope * (image_seq_len - c.base_image_seq_len)

    def sampling_steps(self, num_steps: int, image_seq_len: int | None = None,
                       sigmas: list[float] | None = None) -> list[tuple[float, float]]:
        """(sigma, sigma_next) per step: the scheduler's own sigmas for `num_steps` (terminal 0 included),
        shifted as the pipeline shifts them (FLUX passes its own `sigmas` and the dynamic shift's mu)."""
        kwargs: dict[str, Any] = {"sigmas": sigmas} if sigmas is not None else {}
        if self._euler.config.use_dynamic_shifting:
            kwargs["mu"] = self.mu(image_seq_len or self._euler.config.base_image_seq_len)
        self._euler.set_timesteps(num_steps, **kwargs)
        levels = [float(s) for s in self._euler.sigmas]
        return list(zip(levels[:-1], levels[1:], strict=True))

    def sde_std(self, t: Tensor, t_next: Tensor, eta: float, ndim: int = 4) -> Tensor:
        """Flow-GRPO's noise for the SDE of the flow ODE: eta * sqrt(s / (1 - s)); at s = 1 (the first step) the
        denominator uses the next sigma, as flow_grpo does (``where(sigma == 1, sigma_max, sigma)``)."""
        s = _view(torch.as_tensor(t), ndim)
        s_next = _view(torch.as_tensor(t_next), ndim).to(s.device)
        return eta * (s / (1 - torch.where(s >= 1, s_next, s))).sqrt()

    def step_mean_std(self, pred: Tensor, x: Tensor, t: Tensor, t_next: Tensor, eta: float) -> tuple[Tensor, Tensor]:
        s = _view(torch.as_tensor(t), x.ndim).to(x.device)
        dt = _view(torch.as_tensor(t_next), x.ndim).to(x.device) - s
        std_t = self.sde_std(t, t_next, eta, x.ndim).to(x.device)
        v = pred.float()
        mean = x.float() * (1 + std_t**2 / (2 * s) * dt) + v * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
        return mean, std_t * (-dt).clamp(min=0).sqrt()

    def step(self, pred: Tensor, x: Tensor, t: Tensor, t_next: Tensor, eta: float = 0.0,
             noise: Tensor | None = None) -> Tensor:
        """Euler: x + (s_next - s) v (FlowMatchEulerDiscreteScheduler.step); with eta > 0, Flow-GRPO's SDE step."""
        if eta == 0 or noise is None:
            s = _view(torch.as_tensor(t), x.ndim).to(x.device)
            s_next = _view(torch.as_tensor(t_next), x.ndim).to(x.device)
            return x.float() + (s_next - s) * pred.float()
        mean, std = self.step_mean_std(pred, x, t, t_next, eta)
        return mean + std * noise.float()

    # ------------------------------------------------------------------------- inversion
    def inversion_levels(self, t: Tensor, num_steps: int) -> Tensor:
        """t [N] -> [N, S+1]: clean (0), the grid points k/num_steps strictly below t, then t; padded with t."""
        grid = torch.arange(1, num_steps, device=t.device, dtype=torch.float32) / num_steps
        return _grid_levels(t.float(), grid, torch.full((len(t), 1), self.clean, device=t.device))

    def invert_step(self, pred: Tensor, x: Tensor, t: Tensor, t_next: Tensor, eta: float = 0.0,
                    noise: Tensor | None = None) -> Tensor:
        """ODE inversion: Euler towards more noise, x + (s_next - s) v; eta adds eta * sqrt(s_next - s) noise."""
        s = _view(torch.as_tensor(t), x.ndim).to(x.device)
        s_next = _view(torch.as_tensor(t_next), x.ndim).to(x.device)
        out = x.float() + (s_next - s) * pred.float()
        if eta > 0 and noise is not None:
            out = out + eta * (s_next - s).clamp(min=0).sqrt() * noise.float()
        return out


def _grid_levels(t: Tensor, grid: Tensor, clean: Tensor) -> Tensor:
    """[clean, grid points strictly below t..., t] per row, padded with t to a common width."""
    n_below = (grid[None, :] < t[:, None]).sum(1, keepdim=True)                       # [N, 1]
    width = int(n_below.max()) + 1
    cols = torch.arange(width, device=t.device)[None, :]
    grid = torch.cat([grid, grid[:1]])[:width]            # width <= len(grid) + 1; the extra entry is never chosen
    moves = torch.where(cols < n_below, grid[None, :].to(t.dtype), t[:, None])
    return torch.cat([clean.to(t.dtype), moves], dim=1)


def schedule_for(scheduler_config: dict[str, Any]) -> VPSchedule | FlowSchedule:
    """The schedule a pipeline's scheduler config describes (flow matching by its class name)."""
    name = scheduler_config.get("_class_name", "")
    return FlowSchedule(scheduler_config) if name.startswith("FlowMatch") else VPSchedule(scheduler_config)
