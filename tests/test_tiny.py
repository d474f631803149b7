"""Tests for the offline tiny pipelines and UNet presets in ``diffalign.models.tiny``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file

from diffalign.models.tiny import VP_FAMILIES, build_tiny_pipeline, clip_tokenizer, t5_tokenizer, unet_config

EOS_ID = 49407
PROMPTS = [
    "a cat",
    "A Photo of an ASTRONAUT riding a horse, 4k, highly detailed.",
    "café crème brûlée; naïve Zürich (1999) -- 12.5% off?",
    "  extra   spaces\tand\nnewlines  ",
    "東京タワー at night 🌃 with neon #signs @home",
    "don't we'll they're it's I'd you've",
    "a very long prompt " * 30,  # > 77 tokens: truncated, eot kept at the end
]


@pytest.fixture(scope="module", autouse=True)
def _offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------
def _assert_matches_open_clip(tok, prompts: list[str], pad_id: int) -> None:
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True).input_ids
    ref = open_clip.tokenize(prompts, context_length=77).tolist()  # pads with 0, eot kept when truncating
    for prompt, row, ref_row in zip(prompts, ids, ref, strict=True):
        n = ref_row.index(EOS_ID) + 1
        assert len(row) == 77
        assert row[:n] == ref_row[:n], prompt
        assert row[n:] == [pad_id] * (77 - n), prompt


@pytest.mark.parametrize(("pad_token", "pad_id"), [("<|endoftext|>", EOS_ID), ("!", 0)])
def test_clip_tokenizer_matches_open_clip(pad_token: str, pad_id: int) -> None:
    tok = clip_tokenizer(pad_token=pad_token)
    assert len(tok) == 49408
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, EOS_ID, pad_id)
    assert tok.model_max_length == 77
    _assert_matches_open_clip(tok, PROMPTS, pad_id)
    assert tok(PROMPTS[-1], truncation=True).input_ids[-1] == EOS_ID


def test_clip_tokenizer_exclamation_mark() -> None:
    prompts = ["wow! what a view!!", "hello world!"]
    _assert_matches_open_clip(clip_tokenizer(), prompts, EOS_ID)
    # Like the real SD2/SDXL tokenizers (diffusers#4153): with pad "!", a literal "!" encodes as the pad id 0,
    # whereas open_clip encodes "!</w>" as 256.
    bang = clip_tokenizer(pad_token="!")
    assert bang("hello world!").input_ids == [49406, 3306, 1002, 0, EOS_ID]
    assert open_clip.tokenize(["hello world!"])[0, :5].tolist() == [49406, 3306, 1002, 256, EOS_ID]


def test_clip_tokenizer_max_length() -> None:
    tok = clip_tokenizer(max_length=16)
    assert tok.model_max_length == 16
    ids = tok(PROMPTS[-1], truncation=True).input_ids
    assert len(ids) == 16 and ids[-1] == EOS_ID


# ---------------------------------------------------------------------------------------------------------------
# Tiny pipelines
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {family: build_tiny_pipeline(family, root / family) for family in VP_FAMILIES}   # UNet families


@pytest.fixture(scope="module")
def tiny_pipes(tiny_paths: dict[str, Path]) -> dict[str, DiffusionPipeline]:
    pipes = {family: DiffusionPipeline.from_pretrained(path) for family, path in tiny_paths.items()}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


@pytest.mark.parametrize("family", VP_FAMILIES)
def test_tiny_pipeline_generates(tiny_pipes: dict[str, DiffusionPipeline], family: str) -> None:
    pipe = tiny_pipes[family]
    expected = "StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline"
    assert type(pipe).__name__ == expected
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64
    generator = torch.Generator().manual_seed(0)
    out = pipe("a cat", num_inference_steps=2, height=64, width=64, output_type="np", generator=generator)
    assert out.images.shape == (1, 64, 64, 3)
    assert np.isfinite(out.images).all()


def test_vae_downsamples_by_8(tiny_pipes: dict[str, DiffusionPipeline]) -> None:
    for family, pipe in tiny_pipes.items():
        assert pipe.vae_scale_factor == 8
        latents = pipe.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
        assert latents.shape == (1, 4, 8, 8)
        assert pipe.vae.config.scaling_factor == (0.13025 if family == "sdxl" else 0.18215)


def test_sdxl_text_encoders_feed_unet(tiny_pipes: dict[str, DiffusionPipeline]) -> None:
    pipe = tiny_pipes["sdxl"]
    unet = pipe.unet.config
    hidden = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert hidden == unet.cross_attention_dim
    pooled_dim = pipe.text_encoder_2.config.projection_dim
    assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + pooled_dim
    assert (pipe.tokenizer.pad_token_id, pipe.tokenizer_2.pad_token_id) == (EOS_ID, 0)
    prompt_embeds, _, pooled, _ = pipe.encode_prompt("a cat", do_classifier_free_guidance=False)
    assert prompt_embeds.shape == (1, 77, unet.cross_attention_dim)
    assert pooled.shape == (1, pooled_dim)


def test_prediction_types(tiny_pipes: dict[str, DiffusionPipeline], tmp_path: Path) -> None:
    expected = {"sd15": "epsilon", "sd2": "v_prediction", "sdxl": "epsilon"}
    for family, pipe in tiny_pipes.items():
        assert pipe.scheduler.config.prediction_type == expected[family]
    assert tiny_pipes["sd2"].unet.config.use_linear_projection
    path = build_tiny_pipeline("sd15", tmp_path / "v", prediction_type="v_prediction")
    assert DiffusionPipeline.from_pretrained(path).scheduler.config.prediction_type == "v_prediction"


def test_build_is_cached_and_seeded(tiny_paths: dict[str, Path], tmp_path: Path) -> None:
    path = tiny_paths["sd15"]
    index = path / "model_index.json"
    mtime = index.stat().st_mtime_ns
    assert build_tiny_pipeline("sd15", path, seed=1) == path
    assert index.stat().st_mtime_ns == mtime  # not rebuilt

    def unet_weights(p: Path) -> dict[str, torch.Tensor]:
        return load_file(p / "unet" / "diffusion_pytorch_model.safetensors")

    same = build_tiny_pipeline("sd15", tmp_path / "same", seed=0)
    other = build_tiny_pipeline("sd15", tmp_path / "same", seed=1, overwrite=True)
    assert other == same
    reference, reseeded = unet_weights(path), unet_weights(other)
    assert not all(torch.equal(reference[k], reseeded[k]) for k in reference)
    rebuilt = unet_weights(build_tiny_pipeline("sd15", tmp_path / "again", seed=0))
    assert all(torch.equal(reference[k], rebuilt[k]) for k in reference)
    assert not list(tmp_path.glob(".*.tmp"))  # staging dirs cleaned up


def test_unknown_family_or_preset() -> None:
    with pytest.raises(ValueError, match="family"):
        build_tiny_pipeline("sd9", "/nonexistent")
    with pytest.raises(ValueError, match="preset"):
        unet_config("sd3")          # SD3 has a transformer, not a UNet preset


# ---------------------------------------------------------------------------------------------------------------
# Full-size presets
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("preset", "millions"), [("sd15", 859.52), ("sd2", 865.91), ("sdxl", 2567.46)])
def test_full_unet_preset_parameter_count(preset: str, millions: float) -> None:
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config(preset))
    n_params = sum(p.numel() for p in unet.parameters())
    assert n_params / 1e6 == pytest.approx(millions, abs=0.01)


def test_tiny_pipelines_use_tiny_presets(tiny_pipes: dict[str, DiffusionPipeline]) -> None:
    for family, pipe in tiny_pipes.items():
        for key, value in unet_config(f"tiny-{family}").items():
            got = pipe.unet.config[key]
            assert (list(got) if isinstance(got, list | tuple) else got) == (
                list(value) if isinstance(value, tuple) else value
            ), (family, key)
    assert unet_config("sd15") is not unet_config("sd15")  # fresh copies


def test_tiny_sd3_pipeline_and_its_offline_t5_tokenizer(tmp_path: Path) -> None:
    """The SD3 builder writes a pipeline StableDiffusion3Pipeline loads and runs; T5's ids follow T5's rules."""
    tok = t5_tokenizer()
    ids = tok(["a red circle"], padding="max_length", max_length=12, truncation=True).input_ids[0]
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert ids[ids.index(1) + 1:] == [0] * (12 - ids.index(1) - 1) and 2 not in ids      # eos, then padding
    path = build_tiny_pipeline("sd3", tmp_path / "sd3")
    pipe = DiffusionPipeline.from_pretrained(path)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and pipe.vae.config.latent_channels == 16
    assert pipe.tokenizer_3("a red circle").input_ids == tok("a red circle").input_ids
    out = pipe("a cat", num_inference_steps=2, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()
