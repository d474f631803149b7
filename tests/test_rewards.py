"""Rewards: the [0,1] contract, gradient flow, hand-checked pixel values, checkpoint loading, the registry."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from diffalign.rewards import REWARDS, Reward, build_reward, reward_from_config
from diffalign.rewards.aesthetic import AestheticMLP
from diffalign.rewards.backbone import CLIP_MEAN, CLIP_STD, clip_preprocess

PROMPTS = ["a red cube", "a photo of a blue dog"]   # colour words for prompt_colour
# Tiny random-weight CLIPs, built in-process (no downloads). The real BPE vocabulary needs vocab_size 49408.
OPEN_CLIP_TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
HF_TINY = {
    "projection_dim": 16,
    "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                    "max_position_embeddings": 77, "vocab_size": 49408},
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                      "image_size": 32, "patch_size": 8},
}
HF_TINY_768 = {**HF_TINY, "projection_dim": 768}  # ViT-L/14's embedding width, so the published MLP shape fits
# The published predictor's state-dict layout (christophschuhmann/improved-aesthetic-predictor, MLP.layers).
AESTHETIC_KEYS = {"layers.0": (1024, 768), "layers.2": (128, 1024), "layers.4": (64, 128), "layers.6": (16, 64),
                  "layers.7": (1, 16)}

DIFFERENTIABLE = {
    "brightness": {},
    "saturation": {},
    "target_colour": {"colour": [0.9, 0.2, 0.1]},
    "prompt_colour": {},
    "clip_score": {"model_config": HF_TINY},
    "clip_score[open_clip]": {"backend": "open_clip", "model_config": OPEN_CLIP_TINY},
    "hpsv2": {"checkpoint": None, "model_config": OPEN_CLIP_TINY},
    "pickscore": {"model_config": HF_TINY},
    "aesthetic": {"mlp_checkpoint": None, "model_config": HF_TINY},
    "aesthetic[open_clip]": {"mlp_checkpoint": None, "backend": "open_clip", "model_config": OPEN_CLIP_TINY},
    "weighted_sum": {"components": [{"name": "brightness", "weight": 0.5},
                                    {"name": "clip_score", "weight": 2.0, "model_config": HF_TINY}]},
}
NOT_DIFFERENTIABLE = {
    "prompt_colour_match": {},
    "jpeg_compressibility": {},
    "jpeg_incompressibility": {},
    "weighted_sum[jpeg]": {"components": [{"name": "brightness", "weight": 1.0},
                                          {"name": "jpeg_compressibility", "weight": 1.0}]},
}


def make(key: str, options: dict) -> Reward:
    torch.manual_seed(0)
    return build_reward(key.split("[")[0], **options)


@pytest.fixture(scope="module")
def rewards() -> dict[str, Reward]:
    """Every test configuration, built once."""
    return {key: make(key, opts) for key, opts in {**DIFFERENTIABLE, **NOT_DIFFERENTIABLE}.items()}


def constant(value: float | list[float], size: int = 16, batch: int = 2) -> torch.Tensor:
    colour = torch.tensor(value if isinstance(value, list) else [value] * 3)
    return colour.view(1, 3, 1, 1).expand(batch, 3, size, size).clone()


def test_every_registered_reward_is_tested():
    tested = {key.split("[")[0] for key in {**DIFFERENTIABLE, **NOT_DIFFERENTIABLE}}
    assert tested == set(REWARDS)


@pytest.mark.parametrize("key", list(DIFFERENTIABLE))
def test_gradient_reaches_the_images(rewards, key):
    reward = rewards[key]
    assert reward.differentiable is True
    images = torch.rand(2, 3, 40, 48, generator=torch.Generator().manual_seed(1)).requires_grad_(True)  # not square
    scores = reward(images, PROMPTS)
    assert scores.shape == (2,) and scores.dtype == torch.float32
    scores.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    module = getattr(reward, "module", None)
    if module is not None:  # frozen weights: no parameter trains or collects a gradient
        assert all(not p.requires_grad and p.grad is None for p in module.parameters())
        assert not module.training


@pytest.mark.parametrize("key", list(NOT_DIFFERENTIABLE))
def test_non_differentiable_flag_and_shape(rewards, key):
    scores = rewards[key](torch.rand(3, 3, 16, 16), ["a red x"] * 3)
    assert rewards[key].differentiable is False
    assert scores.shape == (3,) and scores.dtype == torch.float32


def test_jpeg_rewards_order_flat_and_noisy_images(rewards):
    flat, noise = constant(0.5, size=64, batch=1), torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    compress, incompress = rewards["jpeg_compressibility"], rewards["jpeg_incompressibility"]
    assert compress(flat, ["x"]) > compress(noise, ["x"])
    assert incompress(noise, ["x"]) > incompress(flat, ["x"])
    assert torch.equal(compress(noise, ["x"]), -incompress(noise, ["x"]))
    assert 1.0 < incompress(noise, ["x"]).item() < 64 * 64 * 3 / 1000  # kB, below the raw size


@pytest.mark.parametrize("key", list(DIFFERENTIABLE) + list(NOT_DIFFERENTIABLE))
@pytest.mark.parametrize("low, high", [(-1.0, 1.0), (0.0, 1.5)])
def test_images_outside_unit_range_are_rejected(rewards, key, low, high):
    images = torch.linspace(low, high, 2 * 3 * 8 * 8).view(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"\[0,1\]"):
        rewards[key](images, PROMPTS)


@pytest.mark.parametrize("images", [torch.rand(2, 4, 8, 8), torch.rand(3, 8, 8), torch.randint(0, 2, (2, 3, 8, 8)),
                                    torch.full((2, 3, 8, 8), float("nan"))])
def test_malformed_images_are_rejected(rewards, images):
    with pytest.raises(ValueError, match=r"\[0,1\]"):
        rewards["brightness"](images, PROMPTS)


def test_prompt_count_must_match_batch(rewards):
    with pytest.raises(ValueError, match="2 prompts"):
        rewards["brightness"](torch.rand(2, 3, 8, 8), ["only one"])


def test_tiny_overshoot_is_tolerated(rewards):
    assert rewards["brightness"](constant(1.0 + 1e-4), PROMPTS).allclose(torch.tensor(1.0001))


def test_pixel_rewards_hand_checked(rewards):
    assert rewards["brightness"](constant(0.25), PROMPTS).tolist() == [0.25, 0.25]
    assert rewards["saturation"](constant(0.25), PROMPTS).tolist() == [0.0, 0.0]  # grey
    assert rewards["saturation"](constant([1.0, 0.0, 0.0]), PROMPTS).tolist() == [1.0, 1.0]
    assert rewards["saturation"](constant([0.8, 0.4, 0.2]), PROMPTS).allclose(torch.tensor(0.75))  # (0.8-0.2)/0.8
    assert rewards["saturation"](constant(0.0), PROMPTS).tolist() == [0.0, 0.0]  # black stays finite
    red = build_reward("target_colour", colour=[1.0, 0.0, 0.0])
    assert red(constant([1.0, 0.0, 0.0]), PROMPTS).tolist() == [0.0, 0.0]
    assert red(constant(0.0), PROMPTS).tolist() == [-1.0, -1.0]
    assert red(constant([0.0, 1.0, 1.0]), PROMPTS).allclose(torch.tensor(-math.sqrt(3)))


def test_prompt_colour_hand_checked():
    """A pure red (220,40,40) half on grey: the chroma-weighted mean is exactly the red; grey counts for nothing."""
    red = torch.tensor([220, 40, 40]) / 255
    image = torch.full((1, 3, 4, 4), 0.5)
    image[:, :, :, :2] = red.view(1, 3, 1, 1)
    soft, match = build_reward("prompt_colour"), build_reward("prompt_colour_match")
    assert soft(image, ["a red circle"]).item() == pytest.approx(0.0, abs=1e-6)
    blue = torch.tensor([40, 70, 220]) / 255
    distance = torch.linalg.vector_norm(red - blue).item()
    assert soft(image, ["a blue circle"]).item() == pytest.approx(-distance, rel=1e-5)
    assert match(image, ["a red circle"]).item() == 1.0 and match(image, ["A BLUE circle"]).item() == 0.0
    custom = build_reward("prompt_colour_match", colours={"crimson": [220, 40, 40], "teal": [0, 128, 128]})
    assert custom(image, ["crimson, please"]).item() == 1.0


def test_prompt_colour_needs_a_colour_word_and_a_valid_palette():
    with pytest.raises(ValueError, match="names none of the colours"):
        build_reward("prompt_colour")(torch.rand(1, 3, 8, 8), ["a photo of a dog"])
    with pytest.raises(ValueError, match="colours must map names"):
        build_reward("prompt_colour", colours={"red": [300, 0, 0]})


def test_target_colour_exact_match_has_finite_gradient():
    images = constant([0.2, 0.4, 0.6]).requires_grad_(True)
    build_reward("target_colour", colour=[0.2, 0.4, 0.6])(images, PROMPTS).sum().backward()
    assert torch.isfinite(images.grad).all()


def test_target_colour_rejects_bad_colours():
    for colour in ([1.0, 0.0], [255, 0, 0]):
        with pytest.raises(ValueError, match="target_colour"):
            build_reward("target_colour", colour=colour)


def test_clip_preprocess_resizes_short_side_crops_centre_and_normalises():
    mean, std = torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0.25, 0.25, 0.25])
    images = torch.zeros(1, 3, 32, 64)
    images[..., 16:48] = 1.0  # the centre square is white, the sides black
    out = clip_preprocess(images, 16, mean, std)
    assert out.shape == (1, 3, 16, 16)
    assert out[..., 4:12].allclose(torch.tensor(2.0), atol=0.05)  # (1 - 0.5) / 0.25 in the crop's middle
    same = torch.rand(1, 3, 16, 16)
    assert clip_preprocess(same, 16, mean, std).allclose((same - 0.5) / 0.25)  # right size: normalise only


def test_hpsv2_preprocessing_resizes_the_long_side_and_pads_as_open_clips_transform():
    """HPSv2 scores with open_clip's resize_longest_max transform: long side to the size, black padding; compared
    with open_clip's own PIL transform on a non-square image (shortest-side cropping would differ)."""
    import numpy as np
    from open_clip.transform import image_transform
    from PIL import Image

    yy, xx = np.mgrid[0:48, 0:72] / 48.0                                  # a smooth [3, 48, 72] image
    pixels = np.stack([128 + 100 * np.sin(3 * xx + c) * np.cos(2 * yy - c) for c in range(3)]).round().astype(np.uint8)
    images = torch.from_numpy(pixels).float()[None] / 255
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    ours = clip_preprocess(images, 24, mean, std, resize="longest")[0]
    theirs = image_transform(24, is_train=False, resize_mode="longest")(Image.fromarray(pixels.transpose(1, 2, 0)))
    assert ours.shape == theirs.shape == (3, 24, 24)
    black = (-mean / std).view(3, 1)
    assert torch.equal(ours[:, :4], black.expand(3, 24)[:, None].expand(3, 4, 24))         # 4 rows padded on top
    assert torch.allclose(ours[:, 4:20], theirs[:, 4:20], atol=0.02)                      # PIL rounds to uint8
    assert (ours[:, 4:20] - theirs[:, 4:20]).abs().mean() < 0.006
    cropped = clip_preprocess(images, 24, mean, std)                                      # CLIP's shortest side
    assert (cropped[0] - theirs).abs().mean() > 0.3


def test_pickscore_is_logit_scale_times_cosine():
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    cosine = make("clip_score", {"model_config": HF_TINY})(images, PROMPTS)
    pick = make("pickscore", {"model_config": HF_TINY})  # same seed: the same weights
    scale = pick.module.logit_scale.exp()
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-3)  # CLIP's initial temperature
    assert pick(images, PROMPTS).allclose(scale * cosine, atol=1e-5)
    assert cosine.abs().max() <= 1


def test_aesthetic_mlp_loads_published_keys_through_the_option(tmp_path):
    state = {f"{layer}.{kind}": torch.randn(shape if kind == "weight" else shape[:1])
             for layer, shape in AESTHETIC_KEYS.items() for kind in ("weight", "bias")}
    torch.save(state, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")  # the published file is a bare state dict
    assert set(AestheticMLP(768).state_dict()) == set(state)
    reward = make("aesthetic", {"mlp_checkpoint": str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth"),
                                "model_config": HF_TINY_768})
    loaded = reward.module.mlp.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert reward(torch.rand(2, 3, 32, 32), PROMPTS).shape == (2,)


def test_aesthetic_normalises_the_embedding_before_the_mlp():
    torch.manual_seed(0)
    mlp = AestheticMLP(768).eval()
    embedding = torch.randn(4, 768)
    scores = mlp(embedding)
    assert scores.shape == (4,)
    assert mlp(7.5 * embedding).allclose(scores, atol=1e-5)
    assert mlp(embedding / embedding.norm(dim=-1, keepdim=True)).allclose(scores, atol=1e-5)


@pytest.mark.parametrize("key, options, suffix", [
    ("clip_score[open_clip]", {"backend": "open_clip", "model_config": OPEN_CLIP_TINY}, ".safetensors"),
    ("hpsv2", {"model_config": OPEN_CLIP_TINY}, ".pt"),
    ("pickscore", {"model_config": HF_TINY}, ".safetensors"),
])
def test_checkpoint_round_trip(tmp_path, key, options, suffix):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(123)
    source = build_reward(key.split("[")[0], **options, checkpoint=None)
    state = {k: v.contiguous() for k, v in source.module.model.state_dict().items()}
    path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)  # HPSv2's wrapping
    loaded = make(key, {**options, "checkpoint": str(path)})  # seed 0: different random init before loading
    assert not torch.equal(make(key, {**options, "checkpoint": None})(images, PROMPTS), source(images, PROMPTS))
    assert torch.allclose(loaded(images, PROMPTS), source(images, PROMPTS), atol=1e-6)


def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        build_reward("pickscore", model_config=HF_TINY, checkpoint=str(tmp_path / "missing.safetensors"))
    save_file({"nope": torch.zeros(1)}, tmp_path / "wrong.safetensors")
    with pytest.raises(ValueError, match="does not fit"):
        build_reward("pickscore", model_config=HF_TINY, checkpoint=str(tmp_path / "wrong.safetensors"))
    (tmp_path / "model.pkl").write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported checkpoint format"):
        build_reward("pickscore", model_config=HF_TINY, checkpoint=str(tmp_path / "model.pkl"))


def test_reward_from_config_by_name_and_mapping():
    assert reward_from_config("brightness")(constant(0.5), PROMPTS).tolist() == [0.5, 0.5]
    reward = reward_from_config({"name": "target_colour", "colour": [0.0, 0.0, 0.0]})
    assert reward.name == "target_colour" and reward.differentiable
    assert reward(constant(0.0), PROMPTS).tolist() == [0.0, 0.0]
    assert reward_from_config(reward) is reward


def test_registry_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown reward 'beauty'.*aesthetic.*brightness.*weighted_sum"):
        reward_from_config("beauty")
    with pytest.raises(ValueError, match="'brightness': unknown option.*colour"):
        build_reward("brightness", colour=[1, 0, 0])
    with pytest.raises(ValueError, match="'target_colour': missing required option.*colour"):
        reward_from_config("target_colour")
    with pytest.raises(ValueError, match="'aesthetic': missing required option.*mlp_checkpoint"):
        build_reward("aesthetic", model_config=HF_TINY)
    with pytest.raises(ValueError, match="needs a 'name'"):
        reward_from_config({"colour": [0, 0, 0]})
    with pytest.raises(ValueError, match="backend"):
        build_reward("clip_score", backend="jax", model_config=HF_TINY)


def test_weighted_sum_hand_checked():
    reward = reward_from_config({"name": "weighted_sum", "components": [
        {"name": "brightness", "weight": 2.0},
        {"name": "target_colour", "weight": -1.0, "colour": [0.0, 0.0, 0.0]},
    ]})
    expected = 2.0 * 0.25 + (-1.0) * (-math.sqrt(3 * 0.25**2))
    assert reward(constant(0.25), PROMPTS).allclose(torch.tensor(expected))
    assert reward.differentiable


def test_weighted_sum_rejects_bad_components():
    with pytest.raises(ValueError, match="weight"):
        build_reward("weighted_sum", components=[{"name": "brightness"}])
    with pytest.raises(ValueError, match="non-empty list"):
        build_reward("weighted_sum", components=[])
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        build_reward("weighted_sum", components=[{"name": "nope", "weight": 1.0}])


def test_dtype_and_device_options_keep_float32_scores_and_gradients():
    reward = make("pickscore", {"model_config": HF_TINY, "dtype": "bfloat16", "device": "cpu"})
    assert reward.module.logit_scale.dtype == torch.bfloat16
    images = torch.rand(2, 3, 32, 32).requires_grad_(True)
    scores = reward(images, PROMPTS)
    scores.sum().backward()
    assert scores.dtype == torch.float32 and images.grad.dtype == torch.float32
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="dtype"):
        make("pickscore", {"model_config": HF_TINY, "dtype": "int8"})
