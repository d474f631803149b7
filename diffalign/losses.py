"""The papers' objectives as pure tensor functions of per-sample denoising errors.

Each returns ``(loss, metrics)``; metrics are detached scalars. Everything is computed in fp32.
A per-sample error is the mean (not the sum) of the squared error over C, H, W: see ``per_sample_mse``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def per_sample_mse(pred: Tensor, target: Tensor) -> Tensor:
    """[B, ...] x [B, ...] -> [B]: mean squared error over every axis but the batch, in fp32."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def diffusion_dpo(err_w: Tensor, err_l: Tensor, ref_err_w: Tensor, ref_err_l: Tensor,
                  beta: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Diffusion-DPO (Wallace et al. 2023, eq. 14) in the official code's convention.

        inside = -0.5 * beta * ((err_w - err_l) - (ref_err_w - ref_err_l))
        loss   = -log sigmoid(inside), averaged over pairs

    The 0.5 folds the paper's factor T * omega(lambda_t) / 2 into beta; the official SD1.5/SDXL runs use
    beta = 5000. The diffusers SD1.5 example writes -beta * (...) with beta = 2500: the same objective.
    Errors [B] are per-pair, measured at the same (t, noise) for winner and loser.
    """
    err_w, err_l, ref_err_w, ref_err_l = (e.float() for e in (err_w, err_l, ref_err_w, ref_err_l))
    inside = -0.5 * beta * ((err_w - err_l) - (ref_err_w - ref_err_l))
    loss = -F.logsigmoid(inside).mean()
    metrics = {
        "loss": loss.detach(),
        "implicit_accuracy": (inside > 0).float().mean().detach(),
        "inside": inside.mean().detach(),
        "err_w": err_w.mean().detach(),
        "err_l": err_l.mean().detach(),
        "ref_err_w": ref_err_w.mean().detach(),
        "ref_err_l": ref_err_l.mean().detach(),
    }
    return loss, metrics


def mapo_link(err: Tensor, s: float = 0.5) -> Tensor:
    """MaPO's bounded link g(L) = s*L / (exp(s*L) - 1), in (0, 1] for L >= 0, g(0) = 1.

    Computed as x * exp(-x) / -expm1(-x) with x = s*L, which neither divides 0 by 0 at L -> 0 (a series is used
    below 1e-4) nor overflows for large errors; its gradient stays finite in both limits.
    """
    x = s * err.float()
    small = x.abs() < 1e-4
    x_safe = torch.where(small, torch.ones_like(x), x)
    exact = x_safe * torch.exp(-x_safe) / -torch.expm1(-x_safe)
    series = 1 - x / 2 + x * x / 12
    return torch.where(small, series, exact)


def mapo(err_w: Tensor, err_l: Tensor, beta: float, s: float = 0.5,
         num_timesteps: int = 1000) -> tuple[Tensor, dict[str, Tensor]]:
    """MaPO (Hong et al. 2024), reference-free: a margin on the winner/loser log-odds plus SFT on winners.

        margin = g(err_w) - g(err_l)                      g = mapo_link (decreasing: lower error, larger g)
        loss   = mean(err_w) - beta * mean(log sigmoid(T * margin))        T = num_timesteps, beta = beta_mapo

    Errors [B] are the policy's per-pair errors at the same (t, noise) for winner and loser.
    ``implicit_accuracy`` is the fraction of pairs with margin > 0 (the winner denoised better).
    """
    err_w, err_l = err_w.float(), err_l.float()
    margin = mapo_link(err_w, s) - mapo_link(err_l, s)
    log_odds = F.logsigmoid(num_timesteps * margin)
    sft = err_w.mean()
    loss = sft - beta * log_odds.mean()
    metrics = {
        "loss": loss.detach(),
        "implicit_accuracy": (margin > 0).float().mean().detach(),
        "margin": margin.mean().detach(),
        "ratio_loss": -log_odds.mean().detach(),
        "err_w": sft.detach(),
        "err_l": err_l.mean().detach(),
    }
    return loss, metrics


__all__ = ["diffusion_dpo", "diffusion_nft", "mapo", "mapo_link", "nft_optimality", "per_sample_mse"]


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """GRPO's advantages (Flow-GRPO, DanceGRPO): (r - mean) / (std + eps) within each prompt's group.

    ``rewards`` [P * G] are laid out group by group (the G images of prompt 0, then of prompt 1, ...); the std is
    the population std of the group, as flow_grpo computes it with numpy.
    """
    r = rewards.float().view(-1, group_size)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + eps)).flatten()


def clipped_policy_loss(logp: Tensor, logp_old: Tensor, advantages: Tensor,
                        clip_range: float) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped objective as DDPO and Flow-GRPO use it, per step of the trajectory.

        ratio = exp(logp - logp_old);  loss = mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))

    With unchanged weights ratio = 1 and the gradient is the plain policy gradient -A * grad(logp).
    """
    ratio = torch.exp(logp.float() - logp_old.float())
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    metrics = {"ratio": ratio.mean().detach(),
               "clip_fraction": ((ratio - 1).abs() > clip_range).float().mean().detach()}
    return loss, metrics


def nft_optimality(advantages: Tensor, adv_clip_max: float) -> Tensor:
    """DiffusionNFT's optimality probability r in [0, 1] of each sample: clip(A, -max, max) / max / 2 + 1/2."""
    clipped = advantages.float().clamp(-adv_clip_max, adv_clip_max)
    return (clipped / adv_clip_max / 2 + 0.5).clamp(0, 1)


def _adaptive_x0_error(x0_pred: Tensor, x0: Tensor) -> Tensor:
    """[B]: mean squared x0 error over mean |x0 error| (the weight detached, in fp64, at least 1e-5)."""
    with torch.no_grad():
        weight = (x0_pred.double() - x0.double()).abs().flatten(1).mean(1).clamp(min=1e-5)
    return (x0_pred.float() - x0.float()).pow(2).flatten(1).mean(1) / weight.float()


def diffusion_nft(x0_policy: Tensor, x0_old: Tensor, x0: Tensor, r: Tensor, beta: float,
                  scale: float) -> tuple[Tensor, dict[str, Tensor]]:
    """DiffusionNFT (Zheng et al. 2025), negative-aware fine-tuning on the forward process, as NVlabs'
    ``train_nft_sd3.py`` computes it, written in x0 space (the schedule's x0 is affine in the prediction, so the
    mixtures below are the official velocity mixtures, converted):

        x0+ = beta * x0_policy + (1 - beta) * x0_old            implicit positive policy
        x0- = (1 + beta) * x0_old - beta * x0_policy            implicit negative policy
        loss = scale * mean(r * e(x0+) + (1 - r) * e(x0-)) / beta
        e(p) = mean((p - x0)^2) / mean|p - x0|                  per sample; the denominator detached

    ``x0_old`` is the old (sampling) policy's x0 at the same (x_t, t), without gradient; ``r`` [B] the
    optimality probability (``nft_optimality``); ``scale`` the official ``adv_clip_max`` factor. With
    x0_policy = x0_old the gradient is (2r - 1) times a weighted denoising gradient: samples with r > 1/2 are
    pulled toward, those below pushed away from.
    """
    x0_policy, x0_old, r = x0_policy.float(), x0_old.float().detach(), r.float()
    positive = beta * x0_policy + (1 - beta) * x0_old
    negative = (1 + beta) * x0_old - beta * x0_policy
    e_pos, e_neg = _adaptive_x0_error(positive, x0), _adaptive_x0_error(negative, x0)
    per_sample = (r * e_pos + (1 - r) * e_neg) / beta
    loss = (per_sample * scale).mean()
    metrics = {"loss": loss.detach(), "positive_loss": e_pos.mean().detach(),
               "negative_loss": e_neg.mean().detach(),
               "old_deviate": (x0_policy - x0_old).pow(2).mean().detach()}
    return loss, metrics
