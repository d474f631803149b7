"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, last hidden state; epsilon or v-prediction."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from diffalign.models.base import Cond, DiffusionModel, outside_autocast


def tokenize(tokenizer, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
    """Token ids [B, 77], padded and truncated to the tokenizer's length."""
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids.to(device)


class SDModel(DiffusionModel):
    pipeline_class_name = "StableDiffusionPipeline"

    @classmethod
    def _load_text(cls, src, variant, dtype, kw):
        from transformers import CLIPTextModel, CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", **kw)
        encoder = CLIPTextModel.from_pretrained(src, subfolder="text_encoder", variant=variant, dtype=dtype, **kw)
        return [tokenizer], [encoder]

    @torch.no_grad()
    @outside_autocast
    def encode_prompt(self, prompts: Sequence[str]) -> Cond:
        encoder = self.text_encoders[0]
        ids = tokenize(self.tokenizers[0], prompts, encoder.device)
        return Cond(hidden=encoder(ids, return_dict=True).last_hidden_state)   # [B, 77, D]
