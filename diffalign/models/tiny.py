"""Offline tiny diffusers pipelines with random weights, plus full-size UNet architecture presets.

Tests and CPU smoke runs need real ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` checkpoints,
but there is no model hub to download from. This module builds architecturally faithful, *tiny* pipelines
(SD1.5, SD2 and SDXL families) with seeded random weights and writes them to disk with ``save_pretrained``,
so the code under test exercises the normal ``from_pretrained`` loading path::

    path = build_tiny_pipeline("sdxl", tmp_path / "tiny-sdxl")
    pipe = DiffusionPipeline.from_pretrained(path)

What is kept faithful to the real checkpoints:

* the tokenizer is the real CLIP BPE (49408 tokens), rebuilt from open_clip's bundled merges file; SD2 and
  SDXL's OpenCLIP tokenizers pad with ``"!"`` (id 0), SD1.5's pads with ``<|endoftext|>``;
* the VAE downsamples by 8 and has the family's ``scaling_factor``;
* the UNet block layout, SDXL's ``text_time`` micro-conditioning and dual text encoders (penultimate hidden
  states concatenated, pooled projection from the second encoder), SD2's linear projections and
  v-prediction scheduler.

:func:`unet_config` also exposes the full-size SD1.5 / SD2 / SDXL-base UNet architectures, so GPU speed and
memory benchmarks can instantiate them with random weights: ``UNet2DConditionModel(**unet_config("sdxl"))``.
"""

from __future__ import annotations

import atexit
import copy
import functools
import gzip
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from diffalign.checkpoint import write_atomic

__all__ = ["FLOW_FAMILIES", "TINY_FAMILIES", "VP_FAMILIES", "build_tiny_pipeline", "clip_tokenizer", "t5_tokenizer",
           "unet_config"]

VP_FAMILIES = ("sd15", "sd2", "sdxl")
FLOW_FAMILIES = ("sd3", "flux")
TINY_FAMILIES = (*VP_FAMILIES, *FLOW_FAMILIES)
CLIP_VOCAB_SIZE = 49408
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
BOS_ID, EOS_ID = 49406, 49407
TINY_TEXT_DIM = 32  # hidden size of every tiny text encoder (and SDXL's pooled projection)

# --------------------------------------------------------------------------------------------------------------
# UNet presets. Full-size configs mirror the published SD1.5 / SD2 / SDXL-base ``unet/config.json``
# (diffusers' ``attention_head_dim`` is really the number of heads for these models).
# --------------------------------------------------------------------------------------------------------------
_SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "norm_num_groups": 32,
}
_SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 6 micro-conditioning ids * 256 + 1280 pooled text
    "norm_num_groups": 32,
}
_TINY_SD15_UNET: dict[str, Any] = {
    "sample_size": 8,  # 64 px images with the 8x VAE
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "attention_head_dim": (2, 4),
    "cross_attention_dim": TINY_TEXT_DIM,
    "norm_num_groups": 32,
}
_TINY_SDXL_UNET: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "transformer_layers_per_block": (1, 2),
    "attention_head_dim": (2, 4),
    "cross_attention_dim": 2 * TINY_TEXT_DIM,  # penultimate states of both text encoders, concatenated
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + TINY_TEXT_DIM,
    "norm_num_groups": 32,
}
_UNET_PRESETS: dict[str, dict[str, Any]] = {
    "sd15": _SD15_UNET,
    "sd2": {
        **_SD15_UNET,
        "sample_size": 96,
        "attention_head_dim": (5, 10, 20, 20),
        "cross_attention_dim": 1024,
        "use_linear_projection": True,
    },
    "sdxl": _SDXL_UNET,
    "tiny-sd15": _TINY_SD15_UNET,
    "tiny-sd2": {**_TINY_SD15_UNET, "use_linear_projection": True},
    "tiny-sdxl": _TINY_SDXL_UNET,
}


def unet_config(preset: str) -> dict[str, Any]:
    """``UNet2DConditionModel`` kwargs for ``preset`` in ``sd15|sd2|sdxl|tiny-sd15|tiny-sd2|tiny-sdxl``.

    Returns a fresh copy, safe to modify.
    """
    if preset not in _UNET_PRESETS:
        raise ValueError(f"unknown UNet preset {preset!r}; choose from {sorted(_UNET_PRESETS)}")
    return copy.deepcopy(_UNET_PRESETS[preset])


# --------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------
def _bytes_to_unicode() -> list[str]:
    """The 256 printable characters CLIP's byte-level BPE uses for the bytes 0..255 (in CLIP's order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


@functools.lru_cache(maxsize=1)
def _clip_bpe_dir() -> Path:
    """Write ``vocab.json`` / ``merges.txt`` for the CLIP BPE into a temp dir (once per process)."""
    from open_clip.tokenizer import default_bpe

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # line 0 is a version header
    byte_chars = _bytes_to_unicode()
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    assert len(tokens) == CLIP_VOCAB_SIZE, len(tokens)

    out = Path(tempfile.mkdtemp(prefix="diffalign-clip-bpe-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return out


def clip_tokenizer(max_length: int = 77, pad_token: str = EOS_TOKEN) -> CLIPTokenizer:
    """The real CLIP BPE tokenizer, built offline from open_clip's bundled vocabulary.

    ``pad_token="<|endoftext|>"`` matches SD1.x's tokenizer; ``pad_token="!"`` (id 0) matches the OpenCLIP
    tokenizers of SD2 and SDXL (``tokenizer_2``), including their quirk that a literal ``"!"`` in a prompt is
    encoded as the pad token.
    """
    bpe = _clip_bpe_dir()
    return CLIPTokenizer(
        str(bpe / "vocab.json"),
        str(bpe / "merges.txt"),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=pad_token,
        model_max_length=max_length,
    )


# --------------------------------------------------------------------------------------------------------------
# Tiny components
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Family:
    pad_token: str  # tokenizer pad token (tokenizer_2's for SDXL)
    hidden_act: str  # OpenAI CLIP uses quick_gelu, OpenCLIP uses gelu
    vae_scaling_factor: float
    prediction_type: str


_FAMILY_SPECS = {
    "sd15": _Family(EOS_TOKEN, "quick_gelu", 0.18215, "epsilon"),
    "sd2": _Family("!", "gelu", 0.18215, "v_prediction"),
    "sdxl": _Family("!", "gelu", 0.13025, "epsilon"),
}


def _family(family: str) -> _Family:
    if family not in _FAMILY_SPECS:
        raise ValueError(f"unknown family {family!r}; choose from {TINY_FAMILIES}")
    return _FAMILY_SPECS[family]


def _vae(family: str) -> AutoencoderKL:
    """4 blocks (3 downsamples): latents are 8x smaller than images, as in real SD."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=_family(family).vae_scaling_factor,
    )


def _unet(family: str) -> UNet2DConditionModel:
    return UNet2DConditionModel(**unet_config(f"tiny-{family}"))


def _text_config(pad_token: str, hidden_act: str, **extra: Any) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=TINY_TEXT_DIM,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=0 if pad_token == "!" else EOS_ID,
        **extra,
    )


def _text_encoder(pad_token: str, hidden_act: str, projection: bool = False) -> CLIPTextModel:
    if projection:
        return CLIPTextModelWithProjection(_text_config(pad_token, hidden_act, projection_dim=TINY_TEXT_DIM))
    return CLIPTextModel(_text_config(pad_token, hidden_act))


def _scheduler(prediction_type: str) -> DDIMScheduler:
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=False,
    )


# --------------------------------------------------------------------------------------------------------------
# Flow-matching families: a T5 tokenizer trained offline, tiny T5 / transformer / 16-channel VAE
# --------------------------------------------------------------------------------------------------------------
TINY_T5_VOCAB = 320


@functools.lru_cache(maxsize=1)
def _t5_tokenizer_dir() -> Path:
    """A T5-style unigram tokenizer (pad 0, eos 1, unk 2; "</s>" appended) trained in-process on the shipped
    evaluation prompts, saved as tokenizer.json: ``T5TokenizerFast.from_pretrained`` reads it, as the SD3 and FLUX
    pipelines read their own T5 tokenizers. No sentencepiece model or download is needed."""
    from importlib import resources

    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast

    text = resources.files("diffalign").joinpath("assets/eval_prompts.txt").read_text(encoding="utf-8").splitlines()
    text += [f"a {c} {s} on a grey background" for c in ("red", "green", "blue", "yellow")
             for s in ("circle", "square")]
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.Nmt(), normalizers.NFKC(),
                                           normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.train_from_iterator(text * 4, trainers.UnigramTrainer(vocab_size=TINY_T5_VOCAB, unk_token="<unk>",
                                                             special_tokens=["<pad>", "</s>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    out = Path(tempfile.mkdtemp(prefix="diffalign-t5-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                    extra_ids=0).save_pretrained(out)
    return out


def t5_tokenizer() -> Any:
    from transformers import T5TokenizerFast

    return T5TokenizerFast.from_pretrained(_t5_tokenizer_dir())


def _t5_encoder(d_model: int) -> Any:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=TINY_T5_VOCAB, d_model=d_model, d_kv=8, d_ff=37, num_layers=2,
                                   num_heads=4, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))


def _flow_vae(scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    """16 latent channels with a shift factor, no quant convs (as the SD3 and FLUX VAEs)."""
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16),
                         layers_per_block=1, latent_channels=16, norm_num_groups=8, sample_size=64,
                         scaling_factor=scaling_factor, shift_factor=shift_factor, use_quant_conv=False,
                         use_post_quant_conv=False, force_upcast=False)


def _sd3_pipeline() -> DiffusionPipeline:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    joint = 2 * TINY_TEXT_DIM                       # CLIP-L + CLIP-G states, zero-padded to T5's width
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=joint,
                                        caption_projection_dim=32, pooled_projection_dim=2 * TINY_TEXT_DIM,
                                        pos_embed_max_size=16)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_flow_vae(1.5305, 0.0609),
        text_encoder=_text_encoder(EOS_TOKEN, "quick_gelu", projection=True), tokenizer=clip_tokenizer(),
        text_encoder_2=_text_encoder("!", "gelu", projection=True), tokenizer_2=clip_tokenizer(pad_token="!"),
        text_encoder_3=_t5_encoder(joint), tokenizer_3=t5_tokenizer())


def _flux_pipeline() -> DiffusionPipeline:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=TINY_TEXT_DIM, guidance_embeds=True,
                                         axes_dims_rope=(2, 2, 4))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    return FluxPipeline(transformer=transformer, scheduler=scheduler, vae=_flow_vae(0.3611, 0.1159),
                        text_encoder=_text_encoder(EOS_TOKEN, "quick_gelu"), tokenizer=clip_tokenizer(),
                        text_encoder_2=_t5_encoder(32), tokenizer_2=t5_tokenizer())


def _pipeline(family: str, prediction_type: str) -> DiffusionPipeline:
    if family == "sd3":
        return _sd3_pipeline()
    if family == "flux":
        return _flux_pipeline()
    spec = _family(family)
    common = {"vae": _vae(family), "unet": _unet(family), "scheduler": _scheduler(prediction_type)}
    if family == "sdxl":
        return StableDiffusionXLPipeline(
            text_encoder=_text_encoder(EOS_TOKEN, "quick_gelu"),  # OpenAI CLIP ViT-L
            text_encoder_2=_text_encoder(spec.pad_token, spec.hidden_act, projection=True),  # OpenCLIP bigG
            tokenizer=clip_tokenizer(pad_token=EOS_TOKEN),
            tokenizer_2=clip_tokenizer(pad_token=spec.pad_token),
            **common,
        )
    return StableDiffusionPipeline(
        text_encoder=_text_encoder(spec.pad_token, spec.hidden_act),
        tokenizer=clip_tokenizer(pad_token=spec.pad_token),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        **common,
    )


def build_tiny_pipeline(
    family: str,
    path: str | Path,
    seed: int = 0,
    prediction_type: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Build a tiny random-weight ``family`` pipeline and ``save_pretrained`` it to ``path``.

    ``family`` is ``sd15``, ``sd2``, ``sdxl``, ``sd3`` or ``flux``. ``prediction_type`` defaults to the family's
    (``v_prediction`` for sd2, ``epsilon`` for the other VP families; ignored for the flow-matching sd3 and flux).
    If ``path/model_index.json`` already exists the pipeline is not rebuilt
    unless ``overwrite``. Weights are drawn under ``torch.manual_seed(seed)`` inside ``fork_rng`` (the global RNG
    is left untouched). The save goes through a sibling temp dir, so an interrupted build leaves no partial
    pipeline at ``path``. Returns ``path`` for ``DiffusionPipeline.from_pretrained``.
    """
    path = Path(path)
    prediction_type = prediction_type or ("flow" if family in FLOW_FAMILIES else _family(family).prediction_type)
    if (path / "model_index.json").exists() and not overwrite:
        return path
    with torch.random.fork_rng(devices=[]):  # seed the weights without disturbing the caller's RNG
        torch.manual_seed(seed)
        pipe = _pipeline(family, prediction_type)
    return write_atomic(path, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))
