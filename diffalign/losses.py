"""The papers' objectives as pure tensor functions of per-sample denoising errors.

Each returns ``(loss, metrics)``; metrics are detached scalars. Everything is computed in fp32.
A per-sample error is the mean (not the sum) of the squared error over C, H, W: see ``per_sample_mse``.
"""

from __future__ import annotations

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


__all__ = ["diffusion_dpo", "per_sample_mse"]
