"""Rollouts for online methods: step log-probabilities against hand computations, recorded trajectories."""

import math
import random

import pytest
import torch

from diffalign.config import LoraConfig, ModelConfig
from diffalign.models import load_model
from diffalign.models.lora import add_lora
from diffalign.models.schedules import FlowSchedule, VPSchedule
from diffalign.sampling import Trajectory, rollout, step_logprob

SD_DDIM = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
           "beta_schedule": "scaled_linear", "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False}


def gaussian(x, mean, std):
    return (-((x - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)).flatten(1).mean(1)


def test_vp_step_logprob_is_ddpos_formula():
    """DDPO: x0 = (x - sqrt(1-a) eps)/sqrt(a); sigma = eta sqrt((1-a')/(1-a) (1-a/a')); mean = sqrt(a') x0 +
    sqrt(1-a'-sigma^2) eps; log-prob = Gaussian density, mean over latent dims."""
    schedule = VPSchedule(SD_DDIM)
    gen = torch.Generator().manual_seed(0)
    x, eps, x_next = (torch.randn(2, 4, 8, 8, generator=gen) for _ in range(3))
    eta, a, a_prev = 0.8, schedule.alphas_cumprod[500].item(), schedule.alphas_cumprod[480].item()
    x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    mean = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma**2) * eps
    ours = schedule.logprob(eps, x, torch.tensor([500, 500]), torch.tensor([480, 480]), eta, x_next)
    torch.testing.assert_close(ours, gaussian(x_next, mean, sigma), atol=1e-5, rtol=1e-5)


def test_flow_step_logprob_is_flow_grpos_formula():
    """Flow-GRPO: dt = s' - s; std_t = a sqrt(s/(1-s)); mean = x (1 + std_t^2 dt / (2 s)) + v (1 + std_t^2 (1-s) /
    (2 s)) dt; the step's std is std_t sqrt(-dt)."""
    schedule = FlowSchedule({"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                             "shift": 3.0})
    gen = torch.Generator().manual_seed(1)
    x, v, x_next = (torch.randn(2, 16, 4, 4, generator=gen) for _ in range(3))
    s, s_next, a = 0.6, 0.5, 0.7
    dt = s_next - s
    std_t = a * math.sqrt(s / (1 - s))
    mean = x * (1 + std_t**2 / (2 * s) * dt) + v * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
    ours = schedule.logprob(v, x, torch.tensor([s, s]), torch.tensor([s_next, s_next]), a, x_next)
    torch.testing.assert_close(ours, gaussian(x_next, mean, std_t * math.sqrt(-dt)), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module", params=["sd15", "sd3"])
def policy(request, tiny_pipelines):
    model = load_model(ModelConfig(pretrained=str(tiny_pipelines[request.param])))
    params = add_lora(model.denoiser, LoraConfig(rank=4))
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_a_rollout_records_steps_whose_log_probs_the_update_recomputes(policy):
    size, n = (64, 64), 2
    cond = policy.sampling_cond(["a red circle", "a blue square"], size)
    uncond = policy.null_cond(n, size)
    latents = torch.randn(policy.latent_shape(n, size), generator=torch.Generator().manual_seed(0))
    traj = rollout(policy, latents, cond, 4, 3.0, uncond, eta=0.7, generator=torch.Generator().manual_seed(1))
    assert traj.latents.shape == (5, *latents.shape) and traj.log_probs.shape == (4, n)
    assert all(traj.stochastic) and not traj.latents.requires_grad and torch.isfinite(traj.log_probs).all()
    for k in range(4):                       # same weights: ratio exactly 1 (up to float order), with gradient
        logp = step_logprob(policy, traj, k, cond, uncond, 3.0)
        assert logp.requires_grad
        torch.testing.assert_close(logp.detach(), traj.log_probs[k], atol=1e-4, rtol=1e-5)
    again = rollout(policy, latents, cond, 4, 3.0, uncond, eta=0.7, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again.latents, traj.latents)                                   # seeded: reproducible


def test_a_step_per_sample_gives_each_row_its_own_steps_log_probability(policy):
    """DDPO's per-sample timestep order: row b of one call at steps k = [k_0, k_1, ...] equals row b of the call
    at the shared step k_b."""
    size, n = (64, 64), 3
    cond = policy.sampling_cond(["a red circle", "a blue square", "a green circle"], size)
    uncond = policy.null_cond(n, size)
    latents = torch.randn(policy.latent_shape(n, size), generator=torch.Generator().manual_seed(0))
    traj = rollout(policy, latents, cond, 4, 3.0, uncond, eta=0.7, generator=torch.Generator().manual_seed(1))
    k = torch.tensor([2, 0, 3])
    mixed = step_logprob(policy, traj, k, cond, uncond, 3.0).detach()
    for b, kb in enumerate(k.tolist()):
        shared = step_logprob(policy, traj, kb, cond, uncond, 3.0).detach()
        torch.testing.assert_close(mixed[b], shared[b], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(traj.log_prob(k), torch.stack([traj.log_probs[kb, b] for b, kb in enumerate(k)]))
    torch.testing.assert_close(mixed, traj.log_prob(k), atol=1e-4, rtol=1e-5)      # unchanged weights: ratio 1


def test_a_window_makes_only_its_steps_stochastic(policy):
    size = (64, 64)
    cond = policy.sampling_cond(["a red circle"], size)
    latents = torch.randn(policy.latent_shape(1, size), generator=torch.Generator().manual_seed(0))
    traj = rollout(policy, latents, cond, 6, eta=0.7, window=(2, 4), generator=torch.Generator().manual_seed(1))
    assert traj.stochastic == [False, False, True, True, False, False]
    assert (traj.log_probs[[0, 1, 4, 5]] == 0).all() and (traj.log_probs[[2, 3]] != 0).all()
    with pytest.raises(ValueError, match="deterministic"):
        step_logprob(policy, traj, 0, cond)
    plain = rollout(policy, latents, cond, 6, eta=0.0)
    assert not any(plain.stochastic)


# ------------------------------------------------------------------------------------------- GRPO


def test_group_advantages_by_hand():
    from diffalign.losses import group_advantages

    adv = group_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 2.0, 2.0]), group_size=4)
    expected = torch.tensor([0.5, -0.5, 0.5, -0.5]) / (0.5 + 1e-4)        # mean 0.5, population std 0.5
    torch.testing.assert_close(adv[:4], expected)
    assert torch.equal(adv[4:], torch.zeros(4))                            # a group with one reward: no signal


def test_the_clipped_objective_pushes_log_probs_the_advantages_way():
    from diffalign.losses import clipped_policy_loss

    adv = torch.tensor([1.0, -1.0])
    logp = torch.zeros(2, requires_grad=True)
    loss, metrics = clipped_policy_loss(logp, torch.zeros(2), adv, clip_range=0.2)
    loss.backward()
    assert metrics["ratio"] == 1 and loss.item() == 0.0
    assert logp.grad[0] < 0 < logp.grad[1]          # descending raises the good sample's log-prob, lowers the bad
    far = torch.tensor([1.0, 1.0], requires_grad=True)             # ratio e > 1 + clip: no gradient for A > 0
    clipped_policy_loss(far, torch.zeros(2), torch.tensor([1.0, 1.0]), clip_range=0.2)[0].backward()
    assert torch.equal(far.grad, torch.zeros(2))


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_grpo_trains_from_the_cli_with_a_non_differentiable_reward(family, tiny_pipelines, tmp_path):
    import json

    from diffalign import cli

    out = tmp_path / "run"
    code = cli.main(["train", "configs/tiny_grpo_sd15.yaml", f"model.pretrained={tiny_pipelines[family]}",
                     f"output_dir={out}", "method.name=grpo", "method.reward=jpeg_compressibility",
                     "method.group_size=2", "method.num_steps=3", "method.timestep_fraction=0.5",
                     "method.guidance_scale=2.0", "method.kl_beta=0.01", "train.batch_size=2", "train.max_steps=2"])
    assert code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["ratio"] == pytest.approx(1.0, abs=1e-4) and "kl" in r and r["grad_norm"] > 0 for r in rows)
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_rollouts_hold_no_graph_and_the_update_keeps_about_a_latent_per_trained_step(policy):
    """Memory: sampling records plain tensors; each trained step's checkpointed log-probability keeps roughly
    its inputs, not the denoiser's activations."""
    size, n = (64, 64), 2
    cond = policy.sampling_cond(["a red circle", "a blue square"], size)
    latents = torch.randn(policy.latent_shape(n, size), generator=torch.Generator().manual_seed(0))
    saved = []

    def count(fn):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
        saved.append(total[0])
        return out

    traj = count(lambda: rollout(policy, latents, cond, 6, eta=0.7, generator=torch.Generator().manual_seed(1)))
    assert saved[-1] == 0
    check = lambda k: torch.utils.checkpoint.checkpoint(step_logprob, policy, traj, k, cond, use_reentrant=False)
    one = count(lambda: check(0))
    three = count(lambda: sum(check(k) for k in range(3)))
    per_step = (saved[-1] - saved[-2]) / 2
    latent_bytes = latents.numel() * 4
    assert per_step <= 4 * latent_bytes + 4096           # inputs and a few scalars, never activations
    unchecked = count(lambda: step_logprob(policy, traj, 0, cond))
    assert saved[-1] > 20 * per_step                     # the measurement does see activations without it
    assert one.requires_grad and three.requires_grad and unchecked.requires_grad


def test_the_grpo_update_holds_one_steps_graph_whatever_the_number_of_sampler_steps(policy):
    """GRPO yields one loss term per trained step and each is backpropagated before the next is built: the bytes
    autograd holds at once are those of one step for 3 and for 6 sampler steps (the sum over terms, what one
    loss over all steps would hold, doubles), and the terms' gradient is the whole loss's."""
    from diffalign.methods.grpo import GRPO

    def held_bytes(num_steps):
        method = GRPO(reward="brightness", group_size=2, num_steps=num_steps, guidance_scale=1.0)
        batch = method.prepare(policy, {"prompts": ["a red circle"], "size": (32, 32),
                                        "indices": torch.tensor([0]), "seeds": torch.tensor([7])})
        per_term, parts = [], method.loss_parts(policy, batch)
        while True:
            total = [0]

            def pack(t, total=total):
                total[0] += t.numel() * t.element_size()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                part = next(parts, None)
            if part is None:
                return per_term, method, batch
            part[0].backward()
            per_term.append(total[0])

    three, _, _ = held_bytes(3)
    six, method, batch = held_bytes(6)
    assert len(three) == 3 and len(six) == 6
    assert max(six) <= 1.01 * max(three) and sum(six) > 1.9 * sum(three)
    for p in policy.denoiser.parameters():
        p.grad = None
    random_state = random.getstate()
    for part, _ in method.loss_parts(policy, batch):          # term by term ...
        part.backward()
    by_terms = [p.grad.clone() for p in policy.denoiser.parameters() if p.grad is not None]
    for p in policy.denoiser.parameters():
        p.grad = None
    random.setstate(random_state)
    method.loss(policy, batch)[0].backward()                  # ... equals the whole loss's gradient
    whole = [p.grad for p in policy.denoiser.parameters() if p.grad is not None]
    assert whole and len(whole) == len(by_terms)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(by_terms, whole, strict=True))
    for p in policy.denoiser.parameters():
        p.grad = None


def test_per_sample_timesteps_train_each_image_on_its_own_steps(policy):
    """With every step trained the per-sample order changes only the order of the terms: the same gradient as the
    shared order. With a fraction, each image gets its own n distinct stochastic steps."""
    from diffalign.methods.grpo import GRPO

    def gradient(method, batch):
        for p in policy.denoiser.parameters():
            p.grad = None
        method.loss(policy, batch)[0].backward()
        grads = [p.grad.clone() for p in policy.denoiser.parameters() if p.grad is not None]
        for p in policy.denoiser.parameters():
            p.grad = None
        return grads

    settings = {"reward": "brightness", "group_size": 2, "num_steps": 4, "guidance_scale": 1.0}
    shared = GRPO(**settings)
    batch = shared.prepare(policy, {"prompts": ["a red circle", "a blue square"], "size": (32, 32),
                                    "indices": torch.tensor([0, 1]), "seeds": torch.tensor([7, 8])})
    per_sample = GRPO(**settings, per_sample_timesteps=True)
    torch.manual_seed(0)
    a, b = gradient(shared, batch), gradient(per_sample, batch)
    assert a and all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a, b, strict=True))
    traj = Trajectory.from_dict(batch["rollout"])
    torch.manual_seed(1)
    steps = GRPO(**settings, per_sample_timesteps=True, timestep_fraction=0.5).trained_steps(traj)
    order = torch.stack(steps, dim=1)                                   # [4 images, 2 steps each]
    assert order.shape == (4, 2) and all(len(set(row.tolist())) == 2 for row in order)
    assert len({frozenset(row.tolist()) for row in order}) > 1          # not one subset for the batch


def test_on_policy_pairs_are_written_in_the_pickapic_schema_and_train(tiny_pipelines, tmp_path, capsys):
    """diffalign pairs: N samples per prompt, best vs worst by the reward; DPO then trains on the folder."""
    import pyarrow.parquet as pq

    from diffalign import cli

    out = tmp_path / "pairs"
    common = [f"model.pretrained={tiny_pipelines['sd15']}", "eval.num_steps=3", "eval.batch_size=2",
              "data.prompts=[a red circle, a blue square]"]
    assert cli.main(["pairs", "configs/tiny_dpo_sd15.yaml", *common, "--reward", "brightness", "--out", str(out),
                     "--samples", "3"]) == 0
    assert "2 pairs" in capsys.readouterr().out
    table = pq.read_table(out / "train-00000.parquet").to_pydict()
    assert table["caption"] == ["a red circle", "a blue square"] and table["label_0"] == [1.0, 1.0]
    assert all(b > w for b, w in zip(table["score_0"], table["score_1"], strict=True))
    assert cli.main(["train", "configs/tiny_dpo_sd15.yaml", f"model.pretrained={tiny_pipelines['sd15']}",
                     f"data.path={out}", f"output_dir={tmp_path / 'run'}", "data.resolution=64",
                     "train.batch_size=2", "train.max_steps=1"]) == 0


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_raft_trains_on_each_groups_best_samples(family, tiny_pipelines, tmp_path):
    import json

    from diffalign import cli
    from diffalign.config import ConfigError, load_config
    from diffalign.methods.raft import RAFT

    model = load_model(ModelConfig(pretrained=str(tiny_pipelines[family])))
    raft = RAFT(reward="brightness", group_size=3, keep=1, num_steps=2, guidance_scale=1.0)
    torch.manual_seed(0)
    prompts = ["a red circle", "a blue square"]
    x0, cond, rewards = raft.best_samples(model, {"prompts": prompts, "size": (64, 64)})
    assert x0.shape == model.latent_shape(2, (64, 64)) and len(cond) == 2
    assert torch.equal(cond.hidden, model.sampling_cond(prompts, (64, 64)).hidden)   # each prompt's own Cond
    again = raft.reward_fn(model.decode_latents(x0), prompts)
    torch.testing.assert_close(again, rewards.view(2, 3).max(1).values, atol=1e-5, rtol=1e-5)   # the best ones
    out, config = tmp_path / "run", tmp_path / "raft.yaml"
    text = open("configs/tiny_grpo_sd15.yaml").read()
    config.write_text(text[: text.index("method:")] + "method:\n  name: raft\n")     # the same run, RAFT's method
    assert cli.main(["train", str(config), f"model.pretrained={tiny_pipelines[family]}", f"output_dir={out}",
                     "method.reward=brightness", "method.group_size=2", "method.num_steps=2",
                     "method.guidance_scale=1.0", "train.max_steps=2"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["reward_kept"] >= r["reward"] for r in rows)
    with pytest.raises(ConfigError, match="must be below method.group_size"):
        load_config(None, ["method.name=raft", "method.keep=4", "method.group_size=4"])


def test_iterative_dpo_rounds_start_from_the_previous_lora(tiny_pipelines, tmp_path, capsys):
    """diffalign iterate: round 2 samples its pairs from round 1's LoRA and its adapters start from it."""
    from safetensors.torch import load_file

    from diffalign import cli

    out = tmp_path / "online"
    assert cli.main(["iterate", "configs/tiny_dpo_sd15.yaml", f"model.pretrained={tiny_pipelines['sd15']}",
                     f"output_dir={out}", "eval.num_steps=3", "eval.batch_size=3", "data.resolution=64",
                     "data.prompts=[a red circle, a blue square]", "train.batch_size=2", "train.max_steps=2",
                     "train.checkpoint_every=0", "--reward", "brightness", "--samples", "3", "--iterations",
                     "2"]) == 0
    printed = capsys.readouterr().out
    assert "round 1:" in printed and "round 2:" in printed
    one = load_file(out / "round-1" / "final" / "pytorch_lora_weights.safetensors")
    two = load_file(out / "round-2" / "final" / "pytorch_lora_weights.safetensors")
    assert one.keys() == two.keys() and any(not torch.equal(one[k], two[k]) for k in one)
    config = (out / "round-2" / "config.yaml").read_text()
    assert f"init_from: {out / 'round-1' / 'final'}" in config and (out / "round-2" / "pairs").is_dir()


def test_lora_init_from_loads_the_given_adapters(tiny_pipelines, tmp_path):
    from safetensors.torch import load_file

    from diffalign import cli
    from diffalign.config import load_config
    from diffalign.models.lora import lora_state_dict
    from diffalign.trainer import Trainer

    first = tmp_path / "first"
    common = [f"model.pretrained={tiny_pipelines['sd15']}", "data.resolution=64", "data.prompts=[a, b]",
              "train.batch_size=2", "method.name=raft", "method.reward=brightness", "method.group_size=2",
              "method.num_steps=2", "method.guidance_scale=1.0"]
    config = tmp_path / "raft.yaml"
    text = open("configs/tiny_grpo_sd15.yaml").read()
    config.write_text(text[: text.index("method:")])
    assert cli.main(["train", str(config), *common, f"output_dir={first}", "train.max_steps=1"]) == 0
    trainer = Trainer(load_config(config, [*common, f"output_dir={tmp_path / 'second'}",
                                           f"lora.init_from={first / 'final'}"]))
    saved = load_file(first / "final" / "pytorch_lora_weights.safetensors")
    live = lora_state_dict(trainer.model.denoiser)
    assert len(live) == len(saved) and all(torch.equal(live[k].float(), saved["unet." + k]) for k in live)


def test_grpo_resume_is_exact(tiny_pipelines, tmp_path):
    """Rollout noise, timestep subsets and the update all come from restored RNG state: 2 + 2 steps == 4."""
    from safetensors.torch import load_file

    from diffalign import cli

    common = ["configs/tiny_grpo_sd15.yaml", f"model.pretrained={tiny_pipelines['sd15']}", "method.num_steps=3",
              "method.timestep_fraction=0.5", "train.checkpoint_every=2"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli.main(["train", *common, f"output_dir={a}", "train.max_steps=4"]) == 0
    assert cli.main(["train", *common, f"output_dir={b}", "train.max_steps=2"]) == 0
    assert cli.main(["train", *common, f"output_dir={b}", "train.max_steps=4", "train.resume=latest"]) == 0
    wa = load_file(a / "final" / "pytorch_lora_weights.safetensors")
    wb = load_file(b / "final" / "pytorch_lora_weights.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
