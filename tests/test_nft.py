"""DiffusionNFT: the loss against hand-worked values and the official velocity form, and the method's rollout and
update phases on tiny models."""

import json

import pytest
import torch

from diffalign import losses
from diffalign.config import LoraConfig, ModelConfig
from diffalign.models import load_model
from diffalign.models.lora import add_lora
from diffalign.models.schedules import FlowSchedule


def test_optimality_probability_maps_clipped_advantages_to_0_1():
    r = losses.nft_optimality(torch.tensor([-10.0, -5.0, 0.0, 2.5, 5.0, 7.0]), adv_clip_max=5.0)
    torch.testing.assert_close(r, torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0, 1.0]))


@pytest.mark.parametrize("r, value, grad", [(1.0, 5.0, 10.0), (0.0, 5.0, -10.0), (0.5, 5.0, 0.0)])
def test_nft_loss_on_policy_pulls_good_samples_and_pushes_bad_ones(r, value, grad):
    """x0 = 0 and the policy and the old policy both at 1, beta 1, scale 5: both implicit policies sit at 1, so
    each adaptive error is 1^2 / 1 and the loss is 5 whatever r; the gradient is 5 * 2 * (2r - 1)."""
    x0_policy = torch.ones(1, 1, requires_grad=True)
    loss, metrics = losses.diffusion_nft(x0_policy, torch.ones(1, 1), torch.zeros(1, 1), torch.tensor([r]),
                                         beta=1.0, scale=5.0)
    loss.backward()
    assert loss.item() == pytest.approx(value) and x0_policy.grad.item() == pytest.approx(grad)
    assert metrics["old_deviate"].item() == 0.0


def test_nft_loss_off_policy_by_hand():
    """beta 0.5, x0 = 0, policy 2, old 1, r 0.75, scale 5: x0+ = 1.5 (error 2.25 / 1.5 = 1.5), x0- = 0.5 (error
    0.25 / 0.5 = 0.5); loss = 5 * (0.75 * 1.5 + 0.25 * 0.5) / 0.5 = 12.5; d/dpolicy = 5 * (0.75 * 2 * 1.5 / 1.5 *
    0.5 - 0.25 * 2 * 0.5 / 0.5 * 0.5) / 0.5 = 5."""
    x0_policy = torch.full((1, 1), 2.0, requires_grad=True)
    loss, metrics = losses.diffusion_nft(x0_policy, torch.ones(1, 1), torch.zeros(1, 1), torch.tensor([0.75]),
                                         beta=0.5, scale=5.0)
    loss.backward()
    assert loss.item() == pytest.approx(12.5) and x0_policy.grad.item() == pytest.approx(5.0)
    assert metrics["positive_loss"].item() == pytest.approx(1.5)
    assert metrics["negative_loss"].item() == pytest.approx(0.5)


def test_nft_loss_in_x0_space_equals_the_official_velocity_form():
    """NVlabs' train_nft_sd3.py mixes velocities, v+ = beta v + (1 - beta) v_old and v- = (1 + beta) v_old - beta v,
    then takes x0 = x_t - t v of each; ours mixes the schedule's x0 of each prediction: the same numbers."""
    gen = torch.Generator().manual_seed(0)
    x0, x_t, v, v_old = (torch.randn(3, 16, 4, 4, generator=gen) for _ in range(4))
    t = torch.tensor([0.9, 0.5, 0.2])
    adv, beta, clip = torch.tensor([2.0, -1.0, 6.0]), 0.3, 5.0
    tt = t.view(-1, 1, 1, 1)
    r = ((adv.clamp(-clip, clip) / clip) / 2.0 + 0.5).clamp(0, 1)
    pos = x_t - tt * (beta * v + (1 - beta) * v_old)
    neg = x_t - tt * ((1.0 + beta) * v_old - beta * v)
    w_pos = (pos.double() - x0.double()).abs().mean(dim=(1, 2, 3), keepdim=True).clip(min=1e-5)
    w_neg = (neg.double() - x0.double()).abs().mean(dim=(1, 2, 3), keepdim=True).clip(min=1e-5)
    official = ((r * ((pos - x0) ** 2 / w_pos).mean(dim=(1, 2, 3)) / beta
                 + (1 - r) * ((neg - x0) ** 2 / w_neg).mean(dim=(1, 2, 3)) / beta) * clip).mean()
    schedule = FlowSchedule({"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000})
    ours, _ = losses.diffusion_nft(schedule.to_x0(v, x_t, t), schedule.to_x0(v_old, x_t, t), x0,
                                   losses.nft_optimality(adv, clip), beta, clip)
    torch.testing.assert_close(ours.double(), official.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_nft_prepares_old_predictions_and_updates_only_the_adapters(family, tiny_pipelines):
    from diffalign.methods.nft import DiffusionNFT

    model = load_model(ModelConfig(pretrained=str(tiny_pipelines[family])))
    params = add_lora(model.denoiser, LoraConfig(rank=4))
    with torch.no_grad():                            # lora_B starts at zero, which leaves lora_A without gradient
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    nft = DiffusionNFT(reward="brightness", group_size=3, num_steps=4, timestep_fraction=0.75, kl_beta=1e-3)
    batch = nft.prepare(model, {"prompts": ["a red circle", "a blue square"], "size": (64, 64),
                                "seeds": torch.tensor([11, 12])})
    saved = batch["nft"]
    levels = [float(t) for t, _ in model.sampling_steps(4, saved["x0"].shape)]
    assert saved["t"].shape == (3, 6) and saved["x_t"].shape == (3, *saved["x0"].shape)
    for column in saved["t"].T.tolist():            # each image: 3 distinct levels of the sampler's grid
        assert len(set(column)) == 3 and set(column) <= set(levels)
    assert saved["r"].min() >= 0 and saved["r"].max() <= 1
    frozen = {n: p.detach().clone() for n, p in model.denoiser.named_parameters() if not p.requires_grad}
    loss, metrics = nft.loss(model, batch)
    assert metrics["old_deviate"].item() == 0.0      # the old policy is the one that sampled: unchanged weights
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    with torch.no_grad():
        for p in params:
            p.sub_(1e-2 * p.grad.sign())
    _, after = nft.loss(model, batch)                # the same rollouts after an update: off-policy now
    assert after["old_deviate"].item() > 0 and after["kl"].item() > 0
    assert all(torch.equal(p, frozen[n]) for n, p in model.denoiser.named_parameters() if not p.requires_grad)
    again = nft.prepare(model, {"prompts": ["a blue square"], "size": (64, 64), "seeds": torch.tensor([12])})
    torch.testing.assert_close(again["nft"]["t"], saved["t"][:, 3:])   # an example's draws follow its seed


def test_nft_trains_from_the_cli_and_resumes_exactly_inside_a_rollout_cycle(tiny_pipelines, tmp_path):
    """Two minibatches per rollout phase; a run stopped after step 3 holds step 4's prepared batch (rollouts, noised
    latents, the old policy's x0) in its checkpoint, and resuming it ends bit-identical to the run that did not
    stop."""
    from safetensors.torch import load_file

    from diffalign import cli

    config = tmp_path / "nft.yaml"
    text = open("configs/tiny_grpo_sd15.yaml").read()
    config.write_text(text[: text.index("method:")] + "method:\n  name: nft\n")
    common = ["train", str(config), f"model.pretrained={tiny_pipelines['sd15']}", "method.reward=brightness",
              "method.group_size=2", "method.num_steps=2", "method.minibatches=2", "train.batch_size=1",
              "train.checkpoint_every=1", "train.log_every=1"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli.main([*common, f"output_dir={a}", "train.max_steps=4"]) == 0
    assert cli.main([*common, f"output_dir={b}", "train.max_steps=3"]) == 0
    assert cli.main([*common, f"output_dir={b}", "train.max_steps=4", "train.resume=latest"]) == 0
    rows = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all({"reward", "positive_loss", "negative_loss", "kl"} <= r.keys() for r in rows)
    assert rows[0]["old_deviate"] == 0 and rows[1]["old_deviate"] > 0    # step 2 trains on step 1's rollouts
    wa = load_file(a / "final" / "pytorch_lora_weights.safetensors")
    wb = load_file(b / "final" / "pytorch_lora_weights.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
