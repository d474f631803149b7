"""The model contract, run over every model family (tiny random-weight pipelines, loaded from disk)."""

import pytest
import torch

from diffalign.config import LoraConfig, ModelConfig
from diffalign.data.batches import pair_latents
from diffalign.models import FluxModel, SD3Model, SDModel, SDXLModel, detect_family, load_model
from diffalign.models.lora import add_lora

FAMILIES = ["sd15", "sd2", "sdxl", "sd3", "flux"]


@pytest.fixture(scope="module", params=FAMILIES)
def model(request, tiny_pipelines):
    return load_model(ModelConfig(pretrained=str(tiny_pipelines[request.param])))


def _batch(model, b=2):
    torch.manual_seed(0)
    x0 = torch.randn(2 * b, *model.latent_shape(1, (64, 64))[1:])
    cond = model.encode_prompt(["a red circle", "a blue square"][:b]).repeat(2)
    sizes = torch.tensor([[64, 64]] * 2 * b)
    cond = model.add_time_ids(cond, sizes, torch.zeros(2 * b, 2, dtype=torch.long), (64, 64))
    return x0, cond


def test_family_detected_from_model_index(tiny_pipelines):
    assert detect_family(str(tiny_pipelines["sd15"])) is SDModel
    assert detect_family(str(tiny_pipelines["sd2"])) is SDModel
    assert detect_family(str(tiny_pipelines["sdxl"])) is SDXLModel
    assert detect_family(str(tiny_pipelines["sd3"])) is SD3Model
    assert detect_family(str(tiny_pipelines["flux"])) is FluxModel
    with pytest.raises(ValueError, match="model_index.json"):
        detect_family("/nonexistent/pipeline")


def test_prompt_conditioning_matches_the_denoiser(model):
    cond = model.encode_prompt(["a cat", "a dog", ""])
    config = model.denoiser.config
    if isinstance(model, FluxModel):      # T5's states; CLIP-L's pooled output
        assert cond.hidden.shape == (3, model.max_sequence_length, config.joint_attention_dim)
        assert cond.pooled.shape == (3, config.pooled_projection_dim) and cond.time_ids is None
        return
    if isinstance(model, SD3Model):       # CLIP-L + CLIP-G (77 tokens, padded) then T5's tokens, on one axis
        assert cond.hidden.shape == (3, 77 + model.max_sequence_length, config.joint_attention_dim)
        assert cond.pooled.shape == (3, config.pooled_projection_dim) and cond.time_ids is None
        return
    assert cond.hidden.shape[:2] == (3, 77)
    assert cond.hidden.shape[2] == config.cross_attention_dim
    if isinstance(model, SDXLModel):
        assert cond.pooled.shape == (3, model.text_encoders[1].config.projection_dim)
    else:
        assert cond.pooled is None and cond.time_ids is None
    assert cond.repeat(2).hidden.shape[0] == 6
    assert torch.equal(cond.repeat(2).hidden[3:], cond.hidden)


def test_time_ids_from_real_sizes_and_crops(model):
    cond = model.encode_prompt(["a", "b"])
    out = model.add_time_ids(cond, torch.tensor([[512, 768], [300, 200]]), torch.tensor([[0, 96], [12, 0]]), (64, 64))
    if isinstance(model, SDXLModel):
        assert out.time_ids.tolist() == [[512, 768, 0, 96, 64, 64], [300, 200, 12, 0, 64, 64]]
    else:
        assert out is cond


def test_the_schedule_is_the_pipelines(model):
    """The family's schedule is built from the pipeline's scheduler config (details in test_schedules.py)."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    x0, _ = _batch(model)
    if model.schedule.kind == "flow":
        theirs = FlowMatchEulerDiscreteScheduler.from_pretrained(model.source, subfolder="scheduler")
        assert torch.equal(model.schedule.table, theirs.sigmas)
        return
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 10, 500, 999])
    theirs = DDIMScheduler.from_pretrained(model.source, subfolder="scheduler")
    x_t = model.schedule.add_noise(x0, noise, t)
    assert x_t.dtype == torch.float32
    torch.testing.assert_close(x_t, theirs.add_noise(x0, noise, t))
    expected = noise if theirs.config.prediction_type == "epsilon" else theirs.get_velocity(x0, noise, t)
    torch.testing.assert_close(model.schedule.target(x0, noise, t), expected)
    assert model.schedule.prediction_type == theirs.config.prediction_type


def test_vae_round_trip_shapes_and_gradient(model):
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    mean, std = model.encode_images(pixels)
    assert mean.shape == model.latent_shape(2, (64, 64)) and (std > 0).all()
    a, b = model.sample_latents(mean, std), model.sample_latents(mean, std)
    assert not torch.equal(a, b)                          # stochastic: the std is used
    latents = a.clone().requires_grad_(True)
    images = model.decode_latents(latents)
    assert images.shape == (2, 3, 64, 64) and 0 <= images.min() and images.max() <= 1
    images.mean().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0


def test_reference_disables_adapters_and_restores_them(tiny_pipelines):
    model = load_model(ModelConfig(pretrained=str(tiny_pipelines["sdxl"])))
    x0, cond = _batch(model)
    t = torch.full((4,), 300)
    base_out = model.predict(x0, t, cond)
    params = add_lora(model.denoiser, LoraConfig(rank=4))
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    policy_out = model.predict(x0, t, cond)
    assert not torch.allclose(policy_out, base_out)
    with model.reference():
        ref_out = model.predict(x0, t, cond)
        assert not torch.is_grad_enabled()
    torch.testing.assert_close(ref_out, base_out)
    with pytest.raises(RuntimeError, match="boom"), model.reference():
        raise RuntimeError("boom")
    torch.testing.assert_close(model.predict(x0, t, cond), policy_out)   # adapters back on after the error


def test_encode_pairs_uncached(model):
    batch = {"pixels": torch.rand(4, 3, 64, 64) * 2 - 1, "prompts": ["a", "b"],
             "original_sizes": torch.tensor([[64, 64]] * 4), "crops": torch.zeros(4, 2, dtype=torch.long)}
    x0, cond = pair_latents(model, batch)
    assert x0.shape == model.latent_shape(4, (64, 64)) and len(cond) == 4
    assert torch.equal(cond.hidden[:2], cond.hidden[2:])                  # winner and loser share the prompt


@pytest.mark.parametrize("precision", [torch.bfloat16, torch.float16])
def test_encoders_run_in_their_own_dtype_inside_autocast(model, precision):
    """The trainer autocasts the whole loss; the VAE and text encoders must not follow it (an fp32 VAE stays
    fp32, so uncached latents equal what `diffalign cache` stores, and SDXL's VAE never runs in fp16)."""
    seen = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
             for m in (model.vae.encoder.conv_in, model.vae.decoder.conv_out)]
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    try:
        mean, std = model.encode_images(pixels)
        hidden = model.encode_prompt(["a red circle"]).hidden
        with torch.autocast("cpu", dtype=precision):
            mean_ac, std_ac = model.encode_images(pixels)
            hidden_ac = model.encode_prompt(["a red circle"]).hidden
            images = model.decode_latents(mean_ac)
    finally:
        for h in hooks:
            h.remove()
    assert seen == [torch.float32] * 3 and images.dtype == torch.float32
    assert torch.equal(mean, mean_ac) and torch.equal(std, std_ac) and torch.equal(hidden, hidden_ac)


def test_a_force_upcast_vae_is_not_loaded_in_float16(tiny_pipelines, caplog):
    import json
    import logging

    config = json.loads((tiny_pipelines["sdxl"] / "vae" / "config.json").read_text())
    assert config["force_upcast"] is True          # as in the SDXL base VAE's config
    with caplog.at_level(logging.WARNING, logger="diffalign"):
        loaded = load_model(ModelConfig(pretrained=str(tiny_pipelines["sdxl"]), vae_dtype="float16"), denoiser=False)
    assert loaded.vae.dtype == torch.float32 and loaded.denoiser is None and "force_upcast" in caplog.text


def test_every_family_names_the_repeated_blocks_it_has(model):
    """train.compile compiles the family's ``repeated_blocks``; each named class is in the family's network."""
    present = {type(m).__name__ for m in model.denoiser.modules()}
    assert set(model.repeated_blocks) <= present


def test_compiled_blocks_give_the_eager_output_and_lora_gradient(tiny_pipelines, compile_graphs):
    """Regional compilation (train.compile) on FLUX's two block classes: dynamo captures them and the prediction
    and LoRA gradient equal eager's. The UNet's blocks go through the trainer in tests/test_train.py."""
    model = load_model(ModelConfig(pretrained=str(tiny_pipelines["flux"])))
    params = add_lora(model.denoiser, LoraConfig(rank=4))
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    x0, cond = _batch(model)
    t = torch.tensor([0.3, 0.5, 0.7, 0.9])

    def run():
        out = model.predict(x0, t, cond)
        out.square().mean().backward()
        grads = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return out.detach(), grads

    eager_out, eager_grads = run()
    blocks = model.compile_blocks(backend="diffalign_recording")
    assert blocks == sum(type(m).__name__ in model.repeated_blocks for m in model.denoiser.modules())
    out, grads = run()
    assert compile_graphs, "no block went through torch.compile"
    torch.testing.assert_close(out, eager_out)
    for g, e in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(g, e)
