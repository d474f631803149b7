"""Noise schedules against the diffusers schedulers they stand for, step by step, in fp32."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from diffalign.models.schedules import FlowSchedule, VPSchedule, schedule_for

SD_DDIM = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
           "beta_schedule": "scaled_linear", "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False}
SD3_FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
FLUX_FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
             "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
             "max_image_seq_len": 4096}


def fake_denoiser(x, t):
    """Some deterministic function of (x, t) standing in for a network."""
    return 0.3 * x + 0.01 * torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1) ** 0.5


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_vp_steps_equal_ddim_scheduler(prediction, spacing, eta):
    config = {**SD_DDIM, "prediction_type": prediction, "timestep_spacing": spacing}
    ours, theirs = VPSchedule(config), DDIMScheduler.from_config(config)
    theirs.set_timesteps(12)
    steps = ours.sampling_steps(12)
    assert [t for t, _ in steps] == theirs.timesteps.tolist()
    gen = torch.Generator().manual_seed(0)
    x_ours = x_theirs = torch.randn(2, 4, 8, 8, generator=gen)
    for t, t_next in steps:
        noise = torch.randn(2, 4, 8, 8, generator=gen)
        level = torch.tensor([t, t])
        x_ours = ours.step(fake_denoiser(x_ours, level), x_ours, level, torch.tensor([t_next] * 2), eta, noise)
        x_theirs = theirs.step(fake_denoiser(x_theirs, level), t, x_theirs, eta=eta, variance_noise=noise).prev_sample
        torch.testing.assert_close(x_ours, x_theirs, atol=2e-5, rtol=1e-5)
    assert steps[-1][1] == 0               # set_alpha_to_one = False: the last step lands on abar_0, as in SD


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_vp_noising_targets_and_conversions(prediction):
    config = {**SD_DDIM, "prediction_type": prediction}
    ours, theirs = VPSchedule(config), DDIMScheduler.from_config(config)
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    x_t = ours.add_noise(x0, noise, t)
    torch.testing.assert_close(x_t, theirs.add_noise(x0, noise, t))
    target = ours.target(x0, noise, t)
    torch.testing.assert_close(target, noise if prediction == "epsilon" else theirs.get_velocity(x0, noise, t))
    torch.testing.assert_close(ours.to_x0(target, x_t, t), x0, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(ours.to_eps(target, x_t, t), noise, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(ours.noise_from_xt(x_t, x0, t), noise, atol=2e-4, rtol=1e-4)
    assert ours.sample_t(4096).unique().numel() > 900 and ours.sample_t(4096).max() < 1000


@pytest.mark.parametrize("config, seq_len", [(SD3_FLOW, None), (FLUX_FLOW, 1024), (FLUX_FLOW, 4096)])
def test_flow_steps_equal_flow_match_euler(config, seq_len):
    ours, theirs = FlowSchedule(config), FlowMatchEulerDiscreteScheduler.from_config(config)
    kwargs = {"mu": ours.mu(seq_len)} if seq_len else {}
    theirs.set_timesteps(10, **kwargs)
    steps = ours.sampling_steps(10, image_seq_len=seq_len)
    assert [s for s, _ in steps] + [steps[-1][1]] == pytest.approx(theirs.sigmas.tolist()) and steps[-1][1] == 0
    x_ours = x_theirs = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    for (s, s_next), timestep in zip(steps, theirs.timesteps, strict=True):
        level = torch.tensor([s, s])
        assert ours.timestep(level)[0].item() == pytest.approx(timestep.item(), rel=1e-6)
        x_ours = ours.step(fake_denoiser(x_ours, level), x_ours, level, torch.tensor([s_next] * 2))
        x_theirs = theirs.step(fake_denoiser(x_theirs, level), timestep, x_theirs).prev_sample
        torch.testing.assert_close(x_ours, x_theirs, atol=1e-5, rtol=1e-5)


def test_flux_dynamic_shift_matches_the_published_values():
    flux = FlowSchedule(FLUX_FLOW)
    assert flux.mu(1024) == pytest.approx(0.63)        # 512 px: (512 / 16)^2 packed tokens
    assert flux.mu(4096) == pytest.approx(1.15)


def test_flow_noising_targets_and_training_draws():
    ours = FlowSchedule(SD3_FLOW)
    x0, noise = torch.randn(3, 16, 4, 4), torch.randn(3, 16, 4, 4)
    s = torch.tensor([0.1, 0.5, 0.9])
    x_t = ours.add_noise(x0, noise, s)
    theirs = FlowMatchEulerDiscreteScheduler.from_config(SD3_FLOW)
    theirs.set_timesteps(4)
    k = 2
    sigma, timestep = theirs.sigmas[k], theirs.timesteps[k]
    expected = theirs.scale_noise(x0, timestep[None], noise)
    torch.testing.assert_close(ours.add_noise(x0, noise, sigma.repeat(3)), expected)
    v = ours.target(x0, noise, s)
    torch.testing.assert_close(ours.to_x0(v, x_t, s), x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.to_eps(v, x_t, s), noise, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.noise_from_xt(x_t, x0, s), noise, atol=1e-5, rtol=1e-5)
    draws = ours.sample_t(20000, generator=torch.Generator().manual_seed(0))
    shifted = 3 * 0.5 / (1 + 2 * 0.5)                                   # the shifted median of a uniform u
    assert draws.min() > 0 and draws.max() <= 1 and draws.median().item() == pytest.approx(shifted, abs=0.02)
    logit = FlowSchedule(SD3_FLOW, timestep_sampling="logit_normal").sample_t(20000, generator=torch.Generator())
    assert logit.std() < draws.std()                                    # concentrated in the middle


@pytest.mark.parametrize("schedule, level, nxt", [(VPSchedule(SD_DDIM), 500, 480),
                                                  (FlowSchedule(SD3_FLOW), 0.6, 0.5)])
def test_step_logprob_is_the_gaussian_density_of_the_step(schedule, level, nxt):
    x = torch.randn(2, 4, 8, 8)
    noise = torch.randn(2, 4, 8, 8)
    t, t_next = torch.tensor([level] * 2), torch.tensor([nxt] * 2)
    pred = fake_denoiser(x, t)
    x_next, logp = schedule.step_logprob(pred, x, t, t_next, 0.8, noise)
    torch.testing.assert_close(x_next, schedule.step(pred, x, t, t_next, 0.8, noise))
    mean = schedule.step(pred, x, t, t_next, 0.8, torch.zeros_like(noise))
    std = ((x_next - mean) / noise).flatten()[0]
    expected = torch.distributions.Normal(mean, std.abs()).log_prob(x_next).flatten(1).mean(1)
    torch.testing.assert_close(logp, expected, atol=1e-4, rtol=1e-4)


def test_flow_inversion_of_a_straight_path_is_exact():
    """With the velocity of the straight line from x0 to n, Euler inversion lands on the forward-noised point."""
    flow = FlowSchedule(SD3_FLOW)
    x0, n = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    t = torch.tensor([0.35, 0.8])
    levels = flow.inversion_levels(t, 10)
    assert levels[0].tolist() == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.35, 0.35, 0.35, 0.35, 0.35])
    x = x0.clone()
    for k in range(levels.shape[1] - 1):
        x = flow.invert_step(n - x0, x, levels[:, k], levels[:, k + 1])
    torch.testing.assert_close(x, flow.add_noise(x0, n, t), atol=1e-5, rtol=1e-5)


def test_vp_inversion_levels_follow_the_grid_and_land_on_t():
    levels = VPSchedule(SD_DDIM).inversion_levels(torch.tensor([0, 100, 350, 999]), 10)
    assert levels[2].tolist()[:5] == [-1, 100, 200, 300, 350]
    assert levels[0].tolist()[:2] == [-1, 0] and levels[1].tolist()[:2] == [-1, 100]
    assert levels[3].tolist() == [-1, 100, 200, 300, 400, 500, 600, 700, 800, 900, 999]


def test_schedule_kind_from_the_scheduler_class():
    assert isinstance(schedule_for(SD_DDIM), VPSchedule)
    assert isinstance(schedule_for({**SD_DDIM, "_class_name": "EulerDiscreteScheduler"}), VPSchedule)
    assert isinstance(schedule_for(SD3_FLOW), FlowSchedule)
    assert math.isclose(FlowSchedule(SD3_FLOW).table[0].item(), 1.0)


def test_flow_sde_first_step_uses_the_next_sigma_as_flow_grpo():
    """At sigma = 1 the SDE std would divide by zero; flow_grpo puts the next sigma in the denominator."""
    flow = FlowSchedule(SD3_FLOW)
    (s, s_next), *_ = flow.sampling_steps(10)
    assert s == 1.0
    std = flow.sde_std(torch.tensor([s]), torch.tensor([s_next]), 0.7)
    assert torch.isfinite(std).all() and std.item() == pytest.approx(0.7 * math.sqrt(1 / (1 - s_next)))
    x, v, noise = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4)
    x_next, logp = flow.step_logprob(v, x, torch.tensor([s]), torch.tensor([s_next]), 0.7, noise)
    assert torch.isfinite(x_next).all() and torch.isfinite(logp).all()
