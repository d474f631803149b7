"""Sampling and inversion over the model contract: the loops, with the arithmetic left to ``model.schedule``.

``sample`` runs the schedule's sampler steps from initial noise with classifier-free guidance and an optional
gradient window; ``invert`` runs the schedule's inversion steps from clean latents up to per-sample levels (DDIM
inversion on VP models, ODE inversion of the flow on flow-matching ones). Both work in fp32 whatever the
denoiser's precision.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from diffalign.models.base import Cond, DiffusionModel
from diffalign.models.schedules import gaussian_logprob


def guidance_on(guidance_scale: float, model: DiffusionModel | None = None) -> bool:
    """The pipelines' rule: classifier-free guidance runs only for a scale above 1, and never on a model whose
    guidance is a network input (FLUX.1-dev)."""
    return guidance_scale > 1.0 and not (model is not None and model.distilled_guidance)


# ------------------------------------------------------------------------------------------------ inversion
@torch.no_grad()
def invert(model: DiffusionModel, x0: Tensor, t: Tensor, cond: Cond, num_steps: int = 10, eta: float = 0.0,
           generator: torch.Generator | None = None, draw: Callable[[torch.Size], Tensor] | None = None) -> Tensor:
    """Invert clean latents x0 [N,C,h,w] up to per-sample levels t [N] with the conditional denoiser, no gradient.

    The path of each sample is ``schedule.inversion_levels`` (the coarse published grid below t, then t itself);
    each move uses the prediction of model.predict (the policy, or the reference inside model.reference()) at
    the level it starts from; with eta > 0 the schedule adds eta-scaled noise: ``draw(x.shape[1:])`` ([N, ...]) for the
    whole batch at every move (each pair's own draws: ``PairDraws.each``), else drawn from ``generator``. Only
    the samples still moving are fed to the denoiser, so a batch costs sum(path lengths), not max * N.
    """
    schedule = model.schedule
    levels = schedule.inversion_levels(t.cpu(), num_steps)      # one host sync, then CPU-only bookkeeping
    x = x0.float().clone()
    for k in range(levels.shape[1] - 1):        # every column moves at least the sample with the longest path
        s, s_next = levels[:, k], levels[:, k + 1]
        idx = (s_next > s).nonzero().squeeze(1)
        from_t, to_t, idx = s[idx].to(x.device), s_next[idx].to(x.device), idx.to(x.device)
        xs = x[idx]
        pred = model.predict(xs, from_t, cond.map(lambda v, i=idx: v[i]))
        noise = None
        if eta > 0:           # every sample draws at every move, moving or not: its draws do not depend on others
            noise = (draw(x.shape[1:]) if draw else torch.randn(x.shape, generator=generator, device=x.device))[idx]
        x[idx] = schedule.invert_step(pred, xs, from_t, to_t, eta, noise)
    return x


# ------------------------------------------------------------------------------------------------ sampling
def guided_prediction(model: DiffusionModel, x: Tensor, t: float | Tensor, cond: Cond, uncond: Cond | None,
                      guidance_scale: float) -> Tensor:
    """The denoiser's output at (x, level t: one for the batch, or [B] per sample), guided: one call on
    [uncond; cond] when guidance is on. Guidance on the raw output equals guidance on eps or x0, since the
    schedule's conversions are affine in it."""
    n = x.shape[0]
    level = t.to(x.device) if torch.is_tensor(t) else torch.full((n,), t, device=x.device)
    if uncond is None or not guidance_on(guidance_scale, model):
        return model.predict(x, level, cond).float()
    pred_u, pred_c = model.predict(torch.cat([x, x]), level.repeat(2), Cond.cat([uncond, cond])).float().chunk(2)
    return pred_u + guidance_scale * (pred_c - pred_u)


def sample(model: DiffusionModel, latents: Tensor, cond: Cond, num_steps: int, guidance_scale: float = 1.0,
           uncond: Cond | None = None, eta: float = 0.0, grad_steps: int = 0,
           generator: torch.Generator | GroupNoise | None = None, steps: list[tuple] | None = None) -> Tensor:
    """The schedule's sampler from initial noise `latents` [B,C,h,w] to clean latents; differentiable in the last
    `grad_steps` steps.

    Steps before the window run under no_grad. Inside it each denoiser call is checkpointed, so what autograd
    keeps per step is the latents, not activations. `uncond` (the empty-prompt Cond) enables CFG. `steps`
    overrides the schedule's (t, t_next) pairs.
    """
    steps = steps if steps is not None else model.sampling_steps(num_steps, latents.shape)
    first_grad = len(steps) - grad_steps
    x = latents.float()
    for i, (t, t_next) in enumerate(steps):
        window = i >= first_grad
        with torch.set_grad_enabled(window and torch.is_grad_enabled()):
            x = _sample_step(model, x, t, t_next, cond, uncond, guidance_scale, eta, generator, checkpointed=window)
    return x


def _sample_step(model: DiffusionModel, x: Tensor, t: float, t_next: float, cond: Cond, uncond: Cond | None,
                 guidance_scale: float, eta: float, generator: torch.Generator | GroupNoise | None,
                 checkpointed: bool) -> Tensor:
    if checkpointed and torch.is_grad_enabled():
        pred = checkpoint(guided_prediction, model, x, t, cond, uncond, guidance_scale, use_reentrant=False)
    else:
        pred = guided_prediction(model, x, t, cond, uncond, guidance_scale)
    noise = randn(x.shape, generator, x.device) if eta > 0 else None
    level = torch.full((x.shape[0],), t, device=x.device)
    return model.schedule.step(pred, x, level, torch.full_like(level, t_next), eta, noise)


# ------------------------------------------------------------------------------------------------ rollouts
class GroupNoise:
    """Gaussian noise drawn group by group, each group of ``group_size`` rows from its own generator seeded by
    ``seeds[g]``: a group's noise is the same whatever batch, process or position it is sampled in. Pass it
    where a ``generator`` is taken."""

    def __init__(self, seeds: Sequence[int], group_size: int, device: torch.device | str) -> None:
        self.group_size, self.device = group_size, torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]

    def randn(self, shape: Sequence[int], shared: bool = False) -> Tensor:
        """Noise of ``shape`` [len(seeds) * group_size, ...]; ``shared``: one draw per group, repeated."""
        if shape[0] != len(self.generators) * self.group_size:
            raise ValueError(f"{shape[0]} rows are not {len(self.generators)} groups of {self.group_size}")
        rows = 1 if shared else self.group_size
        draws = [torch.randn((rows, *shape[1:]), generator=g, device=self.device) for g in self.generators]
        return torch.cat([d.expand(self.group_size, *shape[1:]) for d in draws]).contiguous()


def randn(shape: Sequence[int], generator: torch.Generator | GroupNoise | None, device: torch.device) -> Tensor:
    if isinstance(generator, GroupNoise):
        return generator.randn(shape).to(device)
    return torch.randn(tuple(shape), generator=generator, device=device)


@dataclass
class Trajectory:
    """One batch of sampled trajectories, recorded for policy-gradient training (no autograd graph).

    ``latents[k]`` is x before step k and ``latents[-1]`` the clean result ([S+1, B, ...]); ``steps[k]`` the
    (t, t_next) of step k; ``stochastic[k]`` whether step k drew noise (only those have a log-probability);
    ``log_probs[k]`` [B] the Gaussian log-probability of the move taken (0 where the step was deterministic).
    """

    latents: Tensor
    steps: list[tuple]
    stochastic: list[bool]
    log_probs: Tensor
    eta: float

    @property
    def final(self) -> Tensor:
        return self.latents[-1]

    def log_prob(self, k: int | Tensor) -> Tensor:
        """The recorded log-probability [B] of step k (one for the batch, or [B] steps, one per sample)."""
        if not torch.is_tensor(k):
            return self.log_probs[k]
        return self.log_probs[k.to(self.log_probs.device), torch.arange(len(k), device=self.log_probs.device)]

    def to_dict(self) -> dict:
        """Plain tensors and lists (what torch.load(weights_only=True) reads back), for checkpoints."""
        return {"latents": self.latents, "steps": [tuple(map(float, s)) for s in self.steps],
                "stochastic": list(self.stochastic), "log_probs": self.log_probs, "eta": float(self.eta)}

    @classmethod
    def from_dict(cls, state: dict) -> Trajectory:
        return cls(state["latents"], [tuple(s) for s in state["steps"]], list(state["stochastic"]),
                   state["log_probs"], state["eta"])


@torch.no_grad()
def rollout(model: DiffusionModel, latents: Tensor, cond: Cond, num_steps: int, guidance_scale: float = 1.0,
            uncond: Cond | None = None, eta: float = 1.0, window: tuple[int, int] | None = None,
            generator: torch.Generator | GroupNoise | None = None) -> Trajectory:
    """Sample with the schedule's stochastic step and record what a GRPO/DDPO update needs.

    Every step is stochastic (DDIM with eta on VP models, Flow-GRPO's SDE on flow models), or, with ``window``
    = (first, stop), only the steps first..stop-1 (MixGRPO's window; the others take the deterministic step).
    Runs without gradient in the model's precision; the arithmetic of each step is fp32.
    """
    steps = model.sampling_steps(num_steps, latents.shape)
    first, stop = window if window is not None else (0, len(steps))
    x = latents.float()
    xs, log_probs, stochastic = [x], [], []
    for k, (t, t_next) in enumerate(steps):
        pred = guided_prediction(model, x, t, cond, uncond, guidance_scale)
        level = torch.full((x.shape[0],), t, device=x.device)
        level_next = torch.full_like(level, t_next)
        noisy = first <= k < stop and eta > 0
        if noisy:
            noise = randn(x.shape, generator, x.device)
            x, logp = model.schedule.step_logprob(pred, x, level, level_next, eta, noise)
        else:
            x, logp = model.schedule.step(pred, x, level, level_next), torch.zeros(x.shape[0], device=x.device)
        xs.append(x)
        log_probs.append(logp)
        stochastic.append(noisy)
    return Trajectory(torch.stack(xs), steps, stochastic, torch.stack(log_probs), eta)


def step_gaussian(model: DiffusionModel, trajectory: Trajectory, k: int | Tensor, cond: Cond,
                  uncond: Cond | None = None, guidance_scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """(log p(x_{k+1} | x_k) [B], mean, std) of recorded step k under the model's current weights, with gradient,
    from one (guided) denoiser call: the policy ratio's numerator, and the Gaussian a KL term compares. ``k`` is
    one step for the batch, or a step per sample ([B] integers: DDPO's per-sample timestep order)."""
    per_sample = torch.is_tensor(k)
    ks = k.tolist() if per_sample else [k]
    if not all(trajectory.stochastic[j] for j in ks):
        raise ValueError(f"step(s) {sorted({j for j in ks if not trajectory.stochastic[j]})} of the trajectory "
                         "were deterministic: they have no log-probability")
    if per_sample:
        rows = torch.arange(len(ks), device=trajectory.latents.device)
        index = k.to(trajectory.latents.device)
        x, x_next = trajectory.latents[index, rows], trajectory.latents[index + 1, rows]
        table = torch.tensor(trajectory.steps, dtype=torch.float32)[k.cpu()]          # [B, 2]
        level, level_next = table[:, 0].to(x.device), table[:, 1].to(x.device)
    else:
        x, x_next = trajectory.latents[k], trajectory.latents[k + 1]
        t, t_next = trajectory.steps[k]
        level = torch.full((x.shape[0],), t, device=x.device)
        level_next = torch.full_like(level, t_next)
    pred = guided_prediction(model, x, level, cond, uncond, guidance_scale)
    mean, std = model.schedule.step_mean_std(pred, x, level, level_next, trajectory.eta)
    return gaussian_logprob(x_next, mean, std), mean, std


def step_logprob(model: DiffusionModel, trajectory: Trajectory, k: int, cond: Cond, uncond: Cond | None = None,
                 guidance_scale: float = 1.0) -> Tensor:
    """log p(x_{k+1} | x_k) [B] of recorded step k under the current weights (with unchanged weights it equals
    the recorded value)."""
    return step_gaussian(model, trajectory, k, cond, uncond, guidance_scale)[0]
