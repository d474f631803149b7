"""DDIM in latent space, over the model contract: sampling (with CFG and a gradient window) and inversion.

Timesteps are integers in [0, T); the level -1 stands for the clean latent (abar = 1). A DDIM move between two
levels, in either direction, is

    x0_hat = (x - sqrt(1 - abar_from) eps) / sqrt(abar_from)
    x_to   = sqrt(abar_to) x0_hat + sqrt(1 - abar_to - sigma^2) eps + sigma z

All of it runs in fp32 whatever the UNet's precision.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from diffalign.models.base import Cond, DiffusionModel

CLEAN = -1


def abar_at(model: DiffusionModel, t: Tensor, ndim: int = 4) -> Tensor:
    """abar at levels t [B] (CLEAN -> 1), fp32, shaped [B,1,1,1]."""
    abar = model.alpha_bar(t.clamp(min=0), ndim)
    return torch.where((t < 0).view(abar.shape), 1.0, abar)


def ddim_sigma(abar_from: Tensor, abar_to: Tensor) -> Tensor:
    """Std of the DDIM (eta = 1) posterior between two levels: sqrt((1-a_lo)/(1-a_hi) * (1 - a_hi/a_lo)).

    Symmetric in its arguments (a_hi is the noisier level); 0 when either end is clean.
    """
    a_lo, a_hi = torch.maximum(abar_from, abar_to), torch.minimum(abar_from, abar_to)
    var = (1 - a_lo) / (1 - a_hi).clamp(min=1e-12) * (1 - a_hi / a_lo)
    return var.clamp(min=0).sqrt()


def ddim_step(x: Tensor, eps: Tensor, abar_from: Tensor, abar_to: Tensor, sigma: Tensor | float = 0.0,
              noise: Tensor | None = None) -> Tensor:
    """One DDIM move from level `from` to level `to` (either direction); fp32."""
    x0_hat = (x.float() - (1 - abar_from).sqrt() * eps) / abar_from.sqrt()
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    out = abar_to.sqrt() * x0_hat + (1 - abar_to - sigma**2).clamp(min=0).sqrt() * eps
    if noise is not None:
        out = out + sigma * noise
    return out


# ------------------------------------------------------------------------------------------------ inversion
def inversion_levels(t: Tensor, num_steps: int, num_timesteps: int) -> Tensor:
    """t [N] -> levels [N, S+1]: CLEAN, the grid points k*T/num_steps strictly below t, then t; padded with t.

    The grid is the published coarse one (10 points over 0..T); the last move lands exactly on t, so the
    inverted latent sits at the noise level the loss uses.
    """
    grid = torch.arange(1, num_steps, device=t.device, dtype=t.dtype) * num_timesteps // num_steps   # ascending
    n_below = (grid[None, :] < t[:, None]).sum(1, keepdim=True)                                     # [N, 1]
    width = int(n_below.max()) + 1
    cols = torch.arange(width, device=t.device)[None, :]
    grid = torch.cat([grid, grid[:1]])[:width]            # width <= num_steps; the extra entry is never selected
    moves = torch.where(cols < n_below, grid[None, :], t[:, None])
    clean = torch.full((len(t), 1), CLEAN, device=t.device, dtype=t.dtype)
    return torch.cat([clean, moves], dim=1)


@torch.no_grad()
def ddim_invert(model: DiffusionModel, x0: Tensor, t: Tensor, cond: Cond, num_steps: int = 10, eta: float = 0.0,
                generator: torch.Generator | None = None) -> Tensor:
    """Invert clean latents x0 [N,C,h,w] up to per-sample timesteps t [N] with conditional DDIM, no gradient.

    Each move from level s to s' uses eps(x_s, s) of model.predict (the policy, or the reference inside
    model.reference()); with eta > 0 it adds eta * sigma(s, s') * z, sigma being the DDIM posterior std of the
    interval just crossed. Samples whose path is shorter simply stop; only the samples still moving are fed to
    the UNet, so a batch costs sum(path lengths), not max * N.
    """
    levels = inversion_levels(t.long().cpu(), num_steps, model.num_timesteps)   # one host sync, then CPU-only
    x = x0.float().clone()
    for k in range(levels.shape[1] - 1):        # every column moves at least the sample with the longest path
        s, s_next = levels[:, k], levels[:, k + 1]
        idx = (s_next > s).nonzero().squeeze(1)
        from_t, to_t, idx = s[idx].to(x.device), s_next[idx].to(x.device), idx.to(x.device)
        xs, unet_t = x[idx], from_t.clamp(min=0)
        pred = model.predict(xs, unet_t, cond.map(lambda v, i=idx: v[i]))
        eps = model.eps_from_prediction(pred, xs, unet_t)
        a_from, a_to = abar_at(model, from_t), abar_at(model, to_t)
        noise = None
        if eta > 0:
            noise = torch.randn(x.shape, generator=generator, device=x.device)[idx]
        x[idx] = ddim_step(xs, eps, a_from, a_to, eta * ddim_sigma(a_from, a_to), noise)
    return x


# ------------------------------------------------------------------------------------------------ sampling
def ddim_timesteps(model: DiffusionModel, num_steps: int) -> list[int]:
    """Descending DDIM timesteps with diffusers' "leading" spacing and the scheduler's steps_offset."""
    ratio = model.num_timesteps // num_steps
    offset = getattr(model.scheduler.config, "steps_offset", 0) or 0
    return [min(k * ratio + offset, model.num_timesteps - 1) for k in reversed(range(num_steps))]


def guided_eps(model: DiffusionModel, x: Tensor, t: int, cond: Cond, uncond: Cond | None,
               guidance_scale: float) -> Tensor:
    """Classifier-free guided eps at (x, t): one UNet call on [uncond; cond] when guidance is on."""
    n = x.shape[0]
    tt = torch.full((n,), t, device=x.device, dtype=torch.long)
    if uncond is None or guidance_scale == 1.0:
        return model.eps_from_prediction(model.predict(x, tt, cond), x, tt)
    both = Cond.cat([uncond, cond])
    pred = model.predict(torch.cat([x, x]), tt.repeat(2), both)
    eps_u, eps_c = model.eps_from_prediction(pred, torch.cat([x, x]), tt.repeat(2)).chunk(2)
    return eps_u + guidance_scale * (eps_c - eps_u)


def sample(model: DiffusionModel, latents: Tensor, cond: Cond, num_steps: int, guidance_scale: float = 1.0,
           uncond: Cond | None = None, eta: float = 0.0, grad_steps: int = 0,
           generator: torch.Generator | None = None, timesteps: list[int] | None = None) -> Tensor:
    """DDIM from initial noise `latents` [B,C,h,w] to clean latents; differentiable in the last `grad_steps`.

    Steps before the window run under no_grad. Inside it each UNet call is checkpointed, so what autograd keeps
    per step is the latents, not UNet activations. `uncond` (the empty-prompt Cond) enables CFG.
    """
    timesteps = timesteps if timesteps is not None else ddim_timesteps(model, num_steps)
    first_grad = len(timesteps) - grad_steps
    x = latents.float()
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else CLEAN
        with torch.set_grad_enabled(i >= first_grad and torch.is_grad_enabled()):
            x = _sample_step(model, x, t, t_prev, cond, uncond, guidance_scale, eta, generator,
                             checkpointed=i >= first_grad)
    return x


def _sample_step(model: DiffusionModel, x: Tensor, t: int, t_prev: int, cond: Cond, uncond: Cond | None,
                 guidance_scale: float, eta: float, generator: torch.Generator | None, checkpointed: bool) -> Tensor:
    if checkpointed and torch.is_grad_enabled():
        eps = checkpoint(guided_eps, model, x, t, cond, uncond, guidance_scale, use_reentrant=False)
    else:
        eps = guided_eps(model, x, t, cond, uncond, guidance_scale)
    level = torch.tensor([t, t_prev], device=x.device)
    a_from, a_to = abar_at(model, level[:1]), abar_at(model, level[1:])
    noise = torch.randn(x.shape, generator=generator, device=x.device) if eta > 0 else None
    return ddim_step(x, eps, a_from, a_to, eta * ddim_sigma(a_from, a_to), noise)
