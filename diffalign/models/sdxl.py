"""SDXL: two CLIP encoders (penultimate states concatenated), pooled embedding, micro-conditioning."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from diffalign.models.base import Cond, DiffusionModel, outside_autocast
from diffalign.models.sd import tokenize


class SDXLModel(DiffusionModel):
    pipeline_class_name = "StableDiffusionXLPipeline"
    force_zeros_for_empty_prompt = True   # the pipeline's own flag (model_index.json); SDXL base sets it

    @classmethod
    def from_pretrained(cls, cfg, device="cpu", dtype=torch.float32, denoiser=True):
        from diffusers import DiffusionPipeline

        model = super().from_pretrained(cfg, device, dtype, denoiser)
        index = DiffusionPipeline.load_config(cfg.pretrained, revision=cfg.revision)
        model.force_zeros_for_empty_prompt = bool(index.get("force_zeros_for_empty_prompt", True))
        return model

    @classmethod
    def _load_text(cls, src, variant, dtype, kw):
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        tokenizers = [CLIPTokenizer.from_pretrained(src, subfolder=sub, **kw) for sub in ("tokenizer", "tokenizer_2")]
        encoders = [
            CLIPTextModel.from_pretrained(src, subfolder="text_encoder", variant=variant, dtype=dtype, **kw),
            CLIPTextModelWithProjection.from_pretrained(src, subfolder="text_encoder_2", variant=variant,
                                                        dtype=dtype, **kw),
        ]
        return tokenizers, encoders

    @torch.no_grad()
    @outside_autocast
    def encode_prompt(self, prompts: Sequence[str]) -> Cond:
        hidden = []
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            out = encoder(tokenize(tokenizer, prompts, encoder.device), output_hidden_states=True, return_dict=True)
            hidden.append(out.hidden_states[-2])                        # penultimate layer, [B, 77, D_i]
        pooled = out.text_embeds                                        # projected, encoder 2, [B, P]
        return Cond(hidden=torch.cat(hidden, dim=-1), pooled=pooled)    # [B, 77, D_1 + D_2]

    def add_time_ids(self, cond: Cond, original_sizes: Tensor, crops: Tensor,
                     target_size: tuple[int, int] | None = None) -> Cond:
        """time ids = [orig_h, orig_w, crop_top, crop_left, target_h, target_w] per image."""
        n = len(cond)
        target = torch.as_tensor(target_size).expand(n, 2)
        time_ids = torch.cat([original_sizes.reshape(n, 2).cpu(), crops.reshape(n, 2).cpu(), target], dim=1)
        return Cond(hidden=cond.hidden, pooled=cond.pooled, time_ids=time_ids.to(cond.hidden.device).float())

    def _call_denoiser(self, network: torch.nn.Module, x: Tensor, timestep: Tensor, cond: Cond) -> Tensor:
        return network(x, timestep, encoder_hidden_states=cond.hidden, return_dict=False,
                       added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": cond.time_ids})[0]

    def null_cond(self, n: int, size: tuple[int, int]) -> Cond:
        """Zero prompt embeddings, as the pipeline does for an empty negative prompt when the pipeline's
        force_zeros_for_empty_prompt is set (SDXL base); the encoded empty prompt otherwise."""
        cond = self.sampling_cond([""] * n, size)
        if not self.force_zeros_for_empty_prompt:
            return cond
        return Cond(hidden=torch.zeros_like(cond.hidden), pooled=torch.zeros_like(cond.pooled), time_ids=cond.time_ids)
