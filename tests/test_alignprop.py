"""AlignProp and the differentiable sampler: the gradient window, saved-tensor memory, prompts, CLI runs."""

import json

import pytest
import torch

from diffalign import cli, sampling
from diffalign.config import ConfigError, LoraConfig, ModelConfig, load_config
from diffalign.data.pairs import DataError
from diffalign.data.prompts import PromptDataset, read_prompts
from diffalign.methods.alignprop import AlignProp
from diffalign.models import load_model
from diffalign.models.lora import add_lora
from diffalign.rewards import build_reward


@pytest.fixture(scope="module", params=["sd15", "sd3"])      # a VP UNet and a flow-matching transformer
def lora_model(request, tiny_pipelines):
    model = load_model(ModelConfig(pretrained=str(tiny_pipelines[request.param])))
    params = add_lora(model.denoiser, LoraConfig(rank=4))
    return model, params


def generate(model, num_steps, grad_steps, guidance_scale=3.0):
    size = (64, 64)
    cond = model.sampling_cond(["a red circle", "a blue square"], size)
    latents = torch.randn(model.latent_shape(2, size), generator=torch.Generator().manual_seed(0))
    x0 = sampling.sample(model, latents, cond, num_steps, guidance_scale, model.null_cond(2, size), eta=1.0,
                         grad_steps=grad_steps, generator=torch.Generator().manual_seed(1))
    return model.decode_latents(x0)


def test_no_gradient_reaches_the_unet_with_k_0_and_finite_lora_gradients_with_k_1(lora_model):
    model, params = lora_model
    reward = build_reward("brightness")
    images = generate(model, 4, grad_steps=0)
    assert not images.requires_grad                       # nothing upstream of the decoder is differentiable
    for p in params:
        p.grad = None
    reward(generate(model, 4, grad_steps=1), ["a", "b"]).mean().backward()
    grads = [p.grad for p in params]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def saved_bytes(fn):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total, out


def test_saved_memory_does_not_grow_with_sampling_steps(lora_model, monkeypatch):
    model, _ = lora_model
    few, _ = saved_bytes(lambda: generate(model, 4, grad_steps=2))
    many, _ = saved_bytes(lambda: generate(model, 16, grad_steps=2))
    assert few == many                                    # steps outside the window save nothing
    wider, _ = saved_bytes(lambda: generate(model, 16, grad_steps=3))
    per_step = wider - many              # one more step in the window keeps about one latent (measured 2064 bytes)
    latent_bytes = torch.Size(model.latent_shape(2, (64, 64))).numel() * 4
    assert latent_bytes <= per_step <= 2 * latent_bytes

    # the measurement does see activations once the per-call checkpoint is removed (sd15 ~9 MB, sd3 ~3 MB a step)
    monkeypatch.setattr(sampling, "checkpoint", lambda fn, *args, **kw: fn(*args))
    unchecked = [saved_bytes(lambda k=k: generate(model, 16, grad_steps=k))[0] for k in (2, 3)]
    assert unchecked[1] - unchecked[0] > 100 * per_step      # measured: sd15 ~1100x, sd3 ~360x


def test_grad_steps_are_validated_and_drawn_once_in_range():
    with pytest.raises(ConfigError, match="`method.grad_steps` = 0 is out of range"):
        load_config(None, ["method.name=alignprop", "method.grad_steps=0"])
    with pytest.raises(ConfigError, match="grad_steps"):
        load_config(None, ["method.name=alignprop", "method.num_steps=4", "method.grad_steps=5"])
    method = AlignProp(num_steps=50, grad_steps=10, truncation="uniform")
    draws = {method.draw_grad_steps() for _ in range(300)}
    assert draws == set(range(1, 11))
    assert AlignProp(grad_steps=3).draw_grad_steps() == 3
    official = AlignProp(num_steps=50, truncation="gaussian")        # cut ~ int(N(42, 5)) in [1, 50): K = 50 - cut
    draws = [official.draw_grad_steps() for _ in range(4000)]
    assert all(1 <= k <= 49 for k in draws)
    # E[K] = sum_c P(int(X) = c) (50 - c) / P(1 <= int(X) < 50), X ~ N(42, 5): 9.09 (the rejected c >= 50 tail
    # lowers the cut); the mean of 4000 draws has a standard error of about 0.07
    assert 8.85 < sum(draws) / len(draws) < 9.33
    with pytest.raises(ConfigError, match="cut_mean = 42 must lie in"):
        load_config(None, ["method.name=alignprop", "method.num_steps=10", "method.truncation=gaussian"])


def test_a_non_differentiable_reward_is_refused():
    method = AlignProp(reward="jpeg_compressibility")
    with pytest.raises(ConfigError, match="not differentiable"):
        _ = method.reward_fn


def test_prompt_sources(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# animals\na cat\n\n  a dog  \n")
    assert read_prompts(str(path)) == ["a cat", "a dog"]
    assert read_prompts(["x", " y "]) == ["x", "y"]
    with pytest.raises(DataError, match="prompt file not found"):
        read_prompts(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(DataError, match="empty.txt: no prompts"):
        read_prompts(str(tmp_path / "empty.txt"))
    with pytest.raises(DataError, match="not set"):
        read_prompts(None)
    data = PromptDataset(["a", "b", "c"], 64)
    data.repeat_to(8)
    assert len(data) == 9 and data[7] == (1, "b")
    assert data.collate([data[0], data[4]])["prompts"] == ["a", "b"]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_cli_alignprop_run_writes_a_lora_and_logs_the_reward(family, tiny_pipelines, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["train", "configs/tiny_alignprop_sd15.yaml", f"model.pretrained={tiny_pipelines[family]}",
                     f"output_dir={out}", "train.max_steps=2", "train.batch_size=2", "train.checkpoint_every=2",
                     "method.num_steps=3", "method.grad_steps=2", "method.guidance_scale=2.0",
                     "method.reward={name: target_colour, colour: [1.0, 0.0, 0.0]}"])
    assert code == 0, capsys.readouterr().err[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert {"loss", "reward", "grad_steps", "grad_norm"} <= set(rows[0])
    assert rows[0]["loss"] == pytest.approx(-rows[0]["reward"], rel=1e-5)
    assert rows[0]["grad_norm"] > 0
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()


RANK_SCRIPT = """
import sys
from safetensors.torch import save_file
from diffalign.config import load_config
from diffalign.models.base import unwrap
from diffalign.trainer import Trainer

out, pipeline = sys.argv[1], sys.argv[2]
cfg = load_config("configs/tiny_alignprop_sd15.yaml", [f"model.pretrained={pipeline}", f"output_dir={out}",
                  "train.batch_size=2", "method.num_steps=3", "method.grad_steps=2"])
trainer = Trainer(cfg)
batches = trainer.batches()
for _ in range(2):
    trainer.train_step(batches)
lora = {k: v.contiguous() for k, v in unwrap(trainer.model.denoiser).state_dict().items() if "lora" in k}
save_file(lora, f"{out}/rank{trainer.acc.process_index}_of_{trainer.acc.num_processes}.safetensors")
"""


def test_two_processes_keep_identical_weights_with_several_gradient_calls(tiny_pipelines, tmp_path):
    """torchrun, 2 CPU processes, K = 2 UNet calls with gradient per backward, different prompts and noise per
    rank: after two steps both ranks hold the same LoRA, so their gradients were averaged."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    (tmp_path / "ranks.py").write_text(RANK_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(tmp_path / "ranks.py"),
           str(tmp_path), str(tiny_pipelines["sd15"])]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (load_file(tmp_path / f"rank{r}_of_2.safetensors") for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert any(rank0[k].abs().sum() > 0 for k in rank0 if "lora_B" in k)     # and they did train
