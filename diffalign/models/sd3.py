"""SD3 / SD3.5: an MMDiT transformer on 16-channel latents, rectified flow, CLIP-L + CLIP-G + T5 conditioning.

The prompt conditioning is built as ``StableDiffusion3Pipeline.encode_prompt`` builds it: the penultimate hidden
states of both CLIP encoders concatenated on the channel axis (768 + 1280 = 2048), zero-padded to T5's width and
concatenated on the sequence axis with T5's states (77 + ``max_sequence_length`` tokens); the pooled embedding is
both CLIP projections concatenated (2048). Without T5 (a pipeline saved with ``text_encoder_3`` null) its part
is zeros, as in the pipeline. The unconditional branch is the encoded empty prompt (the pipeline's default
negative prompt), not zeros.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from diffalign.models.base import JOINT_LORA_TARGETS, Cond, DiffusionModel, outside_autocast
from diffalign.models.sd import tokenize


class SD3Model(DiffusionModel):
    pipeline_class_name = "StableDiffusion3Pipeline"
    denoiser_class_name = "SD3Transformer2DModel"
    denoiser_folder = "transformer"
    lora_prefix = "transformer"
    lora_targets = JOINT_LORA_TARGETS
    repeated_blocks = ("JointTransformerBlock",)
    max_sequence_length = 256            # the pipeline's default for T5 tokens

    @classmethod
    def _load_text(cls, src, variant, dtype, kw):
        from diffusers import DiffusionPipeline
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        tokenizers: list[Any] = [CLIPTokenizer.from_pretrained(src, subfolder=sub, **kw)
                                 for sub in ("tokenizer", "tokenizer_2")]
        encoders: list[Any] = [CLIPTextModelWithProjection.from_pretrained(src, subfolder=sub, variant=variant,
                                                                           dtype=dtype, **kw)
                               for sub in ("text_encoder", "text_encoder_2")]
        index = DiffusionPipeline.load_config(src, revision=kw.get("revision"))
        if (index.get("text_encoder_3") or [None])[0] is not None:     # T5 is optional in the pipeline
            tokenizers.append(T5TokenizerFast.from_pretrained(src, subfolder="tokenizer_3", **kw))
            encoders.append(T5EncoderModel.from_pretrained(src, subfolder="text_encoder_3", variant=variant,
                                                           dtype=dtype, **kw))
        return tokenizers, encoders

    @torch.no_grad()
    @outside_autocast
    def encode_prompt(self, prompts: Sequence[str]) -> Cond:
        clip_hidden, pooled = [], []
        for tokenizer, encoder in zip(self.tokenizers[:2], self.text_encoders[:2], strict=True):
            out = encoder(tokenize(tokenizer, prompts, encoder.device), output_hidden_states=True, return_dict=True)
            clip_hidden.append(out.hidden_states[-2])                  # penultimate layer, [B, 77, D_i]
            pooled.append(out.text_embeds)                             # [B, P_i]
        clip = torch.cat(clip_hidden, dim=-1)                          # [B, 77, 768 + 1280]
        t5 = self._t5_states(prompts, clip.dtype)                      # [B, L, joint_attention_dim]
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return Cond(hidden=torch.cat([clip, t5.to(clip.dtype)], dim=-2), pooled=torch.cat(pooled, dim=-1))

    def _t5_states(self, prompts: Sequence[str], dtype: torch.dtype) -> torch.Tensor:
        width = self.joint_attention_dim
        if len(self.text_encoders) < 3:
            return torch.zeros(len(prompts), self.max_sequence_length, width, dtype=dtype,
                               device=self.text_encoders[0].device)
        tokenizer, encoder = self.tokenizers[2], self.text_encoders[2]
        ids = tokenizer(list(prompts), padding="max_length", max_length=self.max_sequence_length, truncation=True,
                        add_special_tokens=True, return_tensors="pt").input_ids.to(encoder.device)
        return encoder(ids)[0]

    @property
    def joint_attention_dim(self) -> int:
        if self.denoiser is not None:
            from diffalign.models.base import unwrap

            return unwrap(self.denoiser).config.joint_attention_dim
        return self.text_encoders[2].config.d_model if len(self.text_encoders) > 2 else 4096

    def _call_denoiser(self, network: torch.nn.Module, x: torch.Tensor, timestep: torch.Tensor, cond: Cond) -> Any:
        return network(hidden_states=x, timestep=timestep, encoder_hidden_states=cond.hidden,
                       pooled_projections=cond.pooled, return_dict=False)[0]
