"""FLUX.1: a transformer on 2 x 2-packed 16-channel latents, rectified flow with the resolution-dependent shift,
CLIP-L pooled + T5 conditioning, and (FLUX.1-dev) a guidance *embedding*.

Latents stay unpacked ``[B, 16, h, w]`` everywhere in diffalign (the schedule's arithmetic is elementwise, so
packing does not change it); ``_call_denoiser`` packs them into ``[B, (h/2)(w/2), 64]`` tokens with their
``(0, row, col)`` position ids, calls the transformer with ``timestep = sigma`` (the pipeline passes t / 1000),
and unpacks the output. The initial noise is drawn in the unpacked shape, as ``FluxPipeline.prepare_latents``
draws it, so images match the pipeline's for the same seeds.

FLUX.1-dev is guidance-distilled: ``guidance`` is an input of the network, not classifier-free guidance. It is
``model.guidance`` (``model.guidance`` in the config for training, ``eval.guidance_scale`` when sampling) and
the sampler runs no unconditional branch for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffalign.models.base import JOINT_LORA_TARGETS, Cond, DiffusionModel, outside_autocast, unwrap
from diffalign.models.sd import tokenize


def pack(x: Tensor) -> Tensor:
    """[B, C, h, w] -> [B, (h/2)(w/2), 4C], FluxPipeline._pack_latents."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
    """The inverse of ``pack``: [B, (h/2)(w/2), 4C] -> [B, C, h, w]."""
    b, _, c4 = tokens.shape
    return tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int, device: Any, dtype: torch.dtype) -> Tensor:
    """[(h/2)(w/2), 3] position ids (0, row, col) of the packed tokens."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxModel(DiffusionModel):
    pipeline_class_name = "FluxPipeline"
    denoiser_class_name = "FluxTransformer2DModel"
    denoiser_folder = "transformer"
    lora_prefix = "transformer"
    lora_targets = JOINT_LORA_TARGETS
    repeated_blocks = ("FluxTransformerBlock", "FluxSingleTransformerBlock")
    distilled_guidance = True
    max_sequence_length = 512           # FluxPipeline's default (FLUX.1-schnell allows at most 256)

    guidance: float = 3.5               # the embedded guidance value; FluxPipeline's default guidance_scale

    @classmethod
    def from_pretrained(cls, cfg, device="cpu", dtype=torch.float32, denoiser=True):
        model = super().from_pretrained(cfg, device, dtype, denoiser)
        model.guidance = float(cfg.guidance)
        return model

    @classmethod
    def _load_text(cls, src, variant, dtype, kw):
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        tokenizers = [CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", **kw),
                      T5TokenizerFast.from_pretrained(src, subfolder="tokenizer_2", **kw)]
        encoders = [CLIPTextModel.from_pretrained(src, subfolder="text_encoder", variant=variant, dtype=dtype, **kw),
                    T5EncoderModel.from_pretrained(src, subfolder="text_encoder_2", variant=variant, dtype=dtype,
                                                   **kw)]
        return tokenizers, encoders

    @torch.no_grad()
    @outside_autocast
    def encode_prompt(self, prompts: Sequence[str]) -> Cond:
        clip, t5 = self.text_encoders
        pooled = clip(tokenize(self.tokenizers[0], prompts, clip.device), output_hidden_states=False).pooler_output
        ids = self.tokenizers[1](list(prompts), padding="max_length", max_length=self.max_sequence_length,
                                 truncation=True, return_length=False, return_overflowing_tokens=False,
                                 return_tensors="pt").input_ids.to(t5.device)
        hidden = t5(ids, output_hidden_states=False)[0]
        return Cond(hidden=hidden, pooled=pooled.to(hidden.dtype))        # [B, L, 4096], [B, 768]

    def _call_denoiser(self, network: torch.nn.Module, x: Tensor, timestep: Tensor, cond: Cond) -> Tensor:
        b, _, h, w = x.shape
        config = unwrap(network).config
        guidance = None
        if config.guidance_embeds:
            guidance = torch.full((b,), self.guidance, device=x.device, dtype=torch.float32)
        out = network(hidden_states=pack(x), timestep=timestep.to(x.dtype) / 1000, guidance=guidance,
                      pooled_projections=cond.pooled, encoder_hidden_states=cond.hidden,
                      txt_ids=torch.zeros(cond.hidden.shape[1], 3, device=x.device, dtype=x.dtype),
                      img_ids=image_ids(h, w, x.device, x.dtype), return_dict=False)[0]
        return unpack(out, h, w)

    # ------------------------------------------------------------------------------- the pipeline's sampler grid
    def sampling_steps(self, num_steps: int, latent_shape: Sequence[int]) -> list[tuple]:
        return self.schedule.sampling_steps(num_steps, **self._grid(num_steps, latent_shape))

    def scheduler_kwargs(self, num_steps: int, latent_shape: Sequence[int]) -> dict[str, Any]:
        grid = self._grid(num_steps, latent_shape)
        return {"sigmas": grid["sigmas"], "mu": self.schedule.mu(grid["image_seq_len"])}

    @staticmethod
    def _grid(num_steps: int, latent_shape: Sequence[int]) -> dict[str, Any]:
        """FluxPipeline's sigmas linspace(1, 1/N, N) and its packed sequence length (for the shift's mu)."""
        h, w = latent_shape[-2:]
        return {"sigmas": list(np.linspace(1.0, 1 / num_steps, num_steps)), "image_seq_len": (h // 2) * (w // 2)}
