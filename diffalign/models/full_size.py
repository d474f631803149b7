"""Full-size SD 1.5 and SDXL-base pipelines with random weights, in the diffusers folder layout (no download).

For checks and benchmarks at real size: the UNet, VAE and text encoders have the published architectures
(``unet/config.json``, ``vae/config.json``, ``text_encoder*/config.json`` of runwayml/stable-diffusion-v1-5 and
stabilityai/stable-diffusion-xl-base-1.0), the tokenizers are the real CLIP BPE, and the scheduler is the
published one. The weights are random, so images are noise; shapes, memory and speed are real.

    build_full_size_pipeline("sdxl", "runs/full/sdxl")              # 6.5 GB: UNet in bf16, the rest fp32
    build_full_size_pipeline("sdxl", "runs/full/sdxl-enc", unet=False)   # encoders only (for the cache)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from diffalign.checkpoint import write_atomic
from diffalign.models.tiny import BOS_ID, CLIP_VOCAB_SIZE, EOS_ID, EOS_TOKEN, _scheduler, clip_tokenizer, unet_config

__all__ = ["FLOW_TRANSFORMERS", "build_full_size_pipeline", "flow_scheduler"]

# OpenAI CLIP ViT-L/14 text tower (SD 1.5's encoder, SDXL's first) and OpenCLIP ViT-bigG/14 (SDXL's second).
_CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
           "hidden_act": "quick_gelu", "projection_dim": 768, "pad_token_id": 1}
_CLIP_BIGG = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
              "hidden_act": "gelu", "projection_dim": 1280, "pad_token_id": 1}
_VAE = {"in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4, "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2, "latent_channels": 4, "norm_num_groups": 32}
_FAMILIES = {
    "sd15": {"pipeline": "StableDiffusionPipeline", "vae": {"sample_size": 512, "scaling_factor": 0.18215},
             "text": [("text_encoder", "tokenizer", _CLIP_L, False, EOS_TOKEN)]},
    "sdxl": {"pipeline": "StableDiffusionXLPipeline",
             "vae": {"sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
             "text": [("text_encoder", "tokenizer", _CLIP_L, False, EOS_TOKEN),
                      ("text_encoder_2", "tokenizer_2", _CLIP_BIGG, True, "!")]},
}

# The flow families' transformers, as their transformer/config.json says (stabilityai/stable-diffusion-3.5-medium:
# 2.47B parameters, MMDiT-X with dual attention in the first 13 blocks; black-forest-labs/FLUX.1-dev: 11.9B, 19
# double- and 38 single-stream blocks, guidance embedding), and the flow-matching scheduler configs they ship with.
# Only the transformers are here: memory predictions read latents and prompt embeddings from the cache.
FLOW_TRANSFORMERS = {
    "sd35m": ("SD3Transformer2DModel",
              {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
               "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
               "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
               "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm"}),
    "flux": ("FluxTransformer2DModel",
             {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
              "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
              "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)}),
}
_FLOW_SCHEDULERS = {"sd35m": {"shift": 3.0},
                    "flux": {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                             "base_image_seq_len": 256, "max_image_seq_len": 4096}}


def flow_scheduler(family: str) -> Any:
    """The ``FlowMatchEulerDiscreteScheduler`` of ``sd35m`` or ``flux`` (FLUX.1-dev: the resolution-dependent shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **_FLOW_SCHEDULERS[family])


def _text_encoder(spec: dict, projection: bool) -> torch.nn.Module:
    config = CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=77, bos_token_id=BOS_ID,
                            eos_token_id=EOS_ID, **spec)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _model_index(family: str) -> dict:
    spec = _FAMILIES[family]
    index = {"_class_name": spec["pipeline"], "_diffusers_version": "0.32.0",
             "scheduler": ["diffusers", "DDIMScheduler"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    for encoder, tokenizer, _, projection, _ in spec["text"]:
        index[encoder] = ["transformers", "CLIPTextModelWithProjection" if projection else "CLIPTextModel"]
        index[tokenizer] = ["transformers", "CLIPTokenizer"]
    if family == "sd15":
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    else:
        index["force_zeros_for_empty_prompt"] = True
    return index


def _fill(folder: Path, family: str, unet: bool, unet_dtype: torch.dtype) -> None:
    spec = _FAMILIES[family]
    (folder / "model_index.json").write_text(json.dumps(_model_index(family), indent=2))
    _scheduler("epsilon").save_pretrained(folder / "scheduler")
    AutoencoderKL(**_VAE, **spec["vae"]).save_pretrained(folder / "vae", safe_serialization=True)
    for encoder, tokenizer, text_spec, projection, pad in spec["text"]:
        _text_encoder(text_spec, projection).save_pretrained(folder / encoder, safe_serialization=True)
        clip_tokenizer(pad_token=pad).save_pretrained(folder / tokenizer)
    if unet:
        default = torch.get_default_dtype()
        torch.set_default_dtype(unet_dtype)          # built in its storage dtype: half the peak memory
        try:
            model = UNet2DConditionModel(**unet_config(family))
        finally:
            torch.set_default_dtype(default)
        model.save_pretrained(folder / "unet", safe_serialization=True, max_shard_size="20GB")


def build_full_size_pipeline(family: str, path: str | Path, unet: bool = True,
                             unet_dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """Write a full-size ``family`` (``sd15`` or ``sdxl``) pipeline with random weights to ``path``; kept when
    ``path/model_index.json`` exists. ``unet=False`` leaves out ``unet/`` (what ``diffalign cache`` reads)."""
    if family not in _FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(_FAMILIES)}")
    path = Path(path)
    if (path / "model_index.json").exists() and (not unet or (path / "unet").is_dir()):
        return path
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return write_atomic(path, lambda folder: _fill(folder, family, unet, unet_dtype))
