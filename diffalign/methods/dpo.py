"""Diffusion-DPO (Wallace et al., 2023): DPO on the denoising error at a shared (t, noise) per pair."""

from __future__ import annotations

from dataclasses import dataclass

from diffalign.config import opt


@dataclass
class DiffusionDPO:
    name: str = opt("dpo", "method name")
    beta: float = opt(5000.0, "KL strength beta in the official -0.5*beta convention (5000 for SD1.5/SDXL "
                              "in the official code; the paper's SD1.5 runs use 2000)")
