"""End-to-end training on the tiny pipelines: CLI runs, LoRA export, parameter isolation, resume, NaN guard."""

import json

import pytest
import torch
from conftest import poison_loss
from safetensors.torch import load_file

from diffalign import cli
from diffalign.config import ConfigError, load_config
from diffalign.data.toy import write_toy_pairs
from diffalign.models.base import unwrap
from diffalign.trainer import Trainer

TINY = ["train.batch_size=2", "train.lr=1e-3", "train.log_every=1", "train.report_to=none",
        "data.resolution=64", "data.num_workers=0", "lora.rank=4"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy_pairs(tmp_path_factory.mktemp("toy"), num_pairs=12, size=64)


def overrides(tiny_pipelines, toy, out, family="sdxl", *extra):
    return [f"model.pretrained={tiny_pipelines[family]}", f"data.path={toy}", f"output_dir={out}", *TINY, *extra]


def unet_inputs(model, b=2):
    gen = torch.Generator().manual_seed(1)
    x_t = torch.randn(b, 4, 8, 8, generator=gen)
    t = torch.tensor([100, 700])
    cond = model.add_time_ids(model.encode_prompt(["a red circle", "a blue square"]),
                              torch.tensor([[64, 64]] * b), torch.zeros(b, 2, dtype=torch.long), (64, 64))
    return x_t, t, cond


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_cli_train_writes_a_lora_that_diffusers_loads(family, tiny_pipelines, toy, tmp_path, capsys):
    from diffusers import DiffusionPipeline

    out = tmp_path / "run"
    args = overrides(tiny_pipelines, toy, out, family, "train.max_steps=3", "train.checkpoint_every=2")
    assert cli.main(["train", f"configs/tiny_dpo_{family}.yaml", *args]) == 0
    assert "final weights" in capsys.readouterr().out
    assert (out / "checkpoint-2" / "pytorch_lora_weights.safetensors").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert {"loss", "implicit_accuracy", "err_w", "err_l", "ref_err_w", "ref_err_l", "grad_norm"} <= set(rows[0])

    # the trainer's policy, rebuilt from the final LoRA through diffalign's own resume path
    cfg = load_config(f"configs/tiny_dpo_{family}.yaml", args + ["train.resume=" + str(out / "checkpoint-2")])
    trainer = Trainer(cfg)
    trainer.resume()
    from diffalign.models.lora import load_lora

    load_lora(trainer.model, out / "final")
    x_t, t, cond = unet_inputs(trainer.model)
    with torch.no_grad():
        policy = trainer.model.predict(x_t, t, cond)

    pipe = DiffusionPipeline.from_pretrained(str(tiny_pipelines[family]))
    kwargs = {}
    if cond.pooled is not None:
        kwargs = {"added_cond_kwargs": {"text_embeds": cond.pooled, "time_ids": cond.time_ids}}
    with torch.no_grad():
        base = pipe.unet(x_t, t, encoder_hidden_states=cond.hidden, **kwargs).sample
        pipe.load_lora_weights(str(out / "final"))
        tuned = pipe.unet(x_t, t, encoder_hidden_states=cond.hidden, **kwargs).sample
    torch.testing.assert_close(tuned, policy, atol=1e-5, rtol=1e-4)
    assert (tuned - base).abs().max() > 1e-4


def test_one_step_changes_only_lora_parameters(tiny_pipelines, toy, tmp_path):
    cfg = load_config(None, overrides(tiny_pipelines, toy, tmp_path / "run", "sdxl", "train.max_steps=1"))
    trainer = Trainer(cfg)
    model = trainer.model
    before = {f"unet.{k}": v.clone() for k, v in unwrap(model.denoiser).state_dict().items()}
    for i, module in enumerate([model.vae, *model.text_encoders]):
        before.update({f"m{i}.{k}": v.clone() for k, v in module.state_dict().items()})
    trainer.train_step(trainer.batches())
    after = {f"unet.{k}": v for k, v in unwrap(model.denoiser).state_dict().items()}
    for i, module in enumerate([model.vae, *model.text_encoders]):
        after.update({f"m{i}.{k}": v for k, v in module.state_dict().items()})
    lora = [k for k in before if "lora_" in k]
    assert lora and all(not torch.equal(before[k], after[k]) for k in lora if "lora_B" in k)
    frozen = [k for k in before if "lora_" not in k]
    assert len(frozen) > 100 and all(torch.equal(before[k], after[k]) for k in frozen)


def test_resume_matches_an_uninterrupted_run(tiny_pipelines, toy, tmp_path):
    common = ["train.checkpoint_every=2", "train.lr_scheduler=constant_with_warmup", "train.warmup_steps=2",
              "data.hflip=0.5", "data.crop=random", "data.caption_dropout=0.3"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli.main(["train", "configs/tiny_dpo_sdxl.yaml",
                     *overrides(tiny_pipelines, toy, a, "sdxl", *common, "train.max_steps=8")]) == 0
    assert cli.main(["train", "configs/tiny_dpo_sdxl.yaml",
                     *overrides(tiny_pipelines, toy, b, "sdxl", *common, "train.max_steps=4")]) == 0
    assert cli.main(["train", "configs/tiny_dpo_sdxl.yaml",
                     *overrides(tiny_pipelines, toy, b, "sdxl", *common, "train.max_steps=8",
                                "train.resume=latest")]) == 0
    wa = load_file(a / "final" / "pytorch_lora_weights.safetensors")
    wb = load_file(b / "final" / "pytorch_lora_weights.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # 12 pairs / batch 2 = 6 batches per epoch: steps 7-8 cross into epoch 2 after the resume at step 4
    assert sorted(p.name for p in b.iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint-4", "checkpoint-6", "checkpoint-8"]


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(tiny_pipelines, toy, tmp_path, monkeypatch, capsys):
    poison_loss(monkeypatch, at_call=3)
    out = tmp_path / "run"
    code = cli.main(["train", "configs/tiny_dpo_sdxl.yaml",
                     *overrides(tiny_pipelines, toy, out, "sdxl", "train.max_steps=5", "train.checkpoint_every=2")])
    assert code == 1
    err = capsys.readouterr().err
    assert "non-finite loss or gradient at step 3" in err and "checkpoint-2" in err
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    assert not (out / "final").exists()
    assert load_file(out / "checkpoint-2" / "pytorch_lora_weights.safetensors")


def test_fused_adamw_skips_a_non_finite_step_on_the_device_and_the_guard_stops_one_step_later(
        tiny_pipelines, toy, tmp_path, monkeypatch):
    """With train.fused_adamw the bad step's update is skipped by the optimizer itself (weights, moments and step
    count unchanged) without a host sync; the flag is read after the next step's backward, before that step's
    update, and stops the run naming the bad step. The CLI run ends as the synchronous guard's does."""
    from diffalign.trainer import TrainingDiverged

    poison_loss(monkeypatch, at_call=3)
    cfg = load_config(None, overrides(tiny_pipelines, toy, tmp_path / "run", "sdxl", "train.max_steps=5",
                                      "train.fused_adamw=true"))
    trainer = Trainer(cfg)
    assert trainer.defer_check
    batches = trainer.batches()
    for _ in range(2):
        trainer.train_step(batches)
        trainer.step += 1
    before = {k: v.clone() for k, v in unwrap(trainer.model.denoiser).state_dict().items() if "lora" in k}
    trainer.train_step(batches)                               # step 3: non-finite, no host sync, no raise yet
    trainer.step += 1
    after = {k: v for k, v in unwrap(trainer.model.denoiser).state_dict().items() if "lora" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)             # the update was skipped
    with pytest.raises(TrainingDiverged, match="non-finite loss or gradient at step 3"):
        trainer.train_step(batches)                           # found before step 4's update
    now = {k: v for k, v in unwrap(trainer.model.denoiser).state_dict().items() if "lora" in k}
    assert all(torch.equal(before[k], now[k]) for k in before)
    monkeypatch.undo()
    poison_loss(monkeypatch, at_call=3)
    out = tmp_path / "cli"
    assert cli.main(["train", "configs/tiny_dpo_sdxl.yaml", *overrides(
        tiny_pipelines, toy, out, "sdxl", "train.max_steps=5", "train.checkpoint_every=2",
        "train.fused_adamw=true")]) == 1
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    assert not (out / "final").exists()
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_compiled_denoiser_blocks_train_as_the_eager_ones(tiny_pipelines, toy, tmp_path, compile_graphs):
    """train.compile: the UNet's transformer blocks go through torch.compile (the options reach it: here a
    backend that records its graphs and runs them as AOT autograd's eager backend) under LoRA, gradient
    checkpointing and DPO's adapters-off reference; two steps give the eager run's weights."""
    def train(name, *extra):
        cfg = load_config(None, overrides(tiny_pipelines, toy, tmp_path / name, "sdxl", "train.max_steps=2",
                                          "train.gradient_checkpointing=true", "train.checkpoint_every=0", *extra))
        return load_file(Trainer(cfg).fit() / "pytorch_lora_weights.safetensors")

    eager = train("eager")
    assert not compile_graphs
    compiled = train("compiled", "train.compile=true", "train.compile_options={backend: diffalign_recording}")
    assert compile_graphs, "no block went through torch.compile"
    assert eager.keys() == compiled.keys()
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="unknown key.*modes.*backend, mode"):
        load_config(None, ["train.compile=true", "train.compile_options={modes: max-autotune}"])


def test_channels_last_full_fine_tuning_trains_as_the_default_layout(tiny_pipelines, toy, tmp_path):
    """train.channels_last stores the convolution weights NHWC (the frozen reference copy's too); two full
    fine-tuning steps give the default layout's weights to float tolerance, and the saved folder is ordinary."""
    start = load_file(tiny_pipelines["sd15"] / "unet" / "diffusion_pytorch_model.safetensors")

    def train(name, *extra):
        cfg = load_config(None, overrides(tiny_pipelines, toy, tmp_path / name, "sd15", "lora.enabled=false",
                                          "train.lr=1e-4", "train.max_steps=2", "train.checkpoint_every=0", *extra))
        trainer = Trainer(cfg)
        kernels = [m.weight for net in (unwrap(trainer.model.denoiser), trainer.model.ref_denoiser)
                   for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
        layout = {"nhwc" if w.is_contiguous(memory_format=torch.channels_last) else "nchw" for w in kernels}
        final = trainer.fit()
        norm = json.loads((final.parent / "metrics.jsonl").read_text().splitlines()[0])["grad_norm"]
        return layout, norm, load_file(final / "unet" / "diffusion_pytorch_model.safetensors")

    (default_layout, default_norm, default), (nhwc_layout, nhwc_norm, nhwc) = (
        train("default"), train("nhwc", "train.channels_last=true"))
    assert default_layout == {"nchw"} and nhwc_layout == {"nhwc"}
    assert abs(nhwc_norm - default_norm) < 1e-5 * default_norm          # the first step's gradient: the same
    moved = sum((default[k] - start[k]).square().sum() for k in start).sqrt()
    gap = sum((default[k] - nhwc[k]).square().sum() for k in start).sqrt()
    assert moved > 0 and gap < 2e-2 * moved     # measured 0.86%: Adam's first steps magnify float noise, as DDP's


def test_full_fine_tuning_uses_a_frozen_reference_copy(tiny_pipelines, toy, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(None, overrides(tiny_pipelines, toy, out, "sd15", "lora.enabled=false", "train.max_steps=1",
                                      "train.lr=1e-4"))
    trainer = Trainer(cfg)
    ref_before = {k: v.clone() for k, v in trainer.model.ref_denoiser.state_dict().items()}
    trainer.fit()
    ref_after = trainer.model.ref_denoiser.state_dict()
    assert all(torch.equal(ref_before[k], ref_after[k]) for k in ref_before)
    policy = unwrap(trainer.model.denoiser).state_dict()
    assert any(not torch.equal(policy[k], ref_after[k]) for k in ref_after)
    assert (out / "final" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_bad_data_is_reported_by_the_cli(tiny_pipelines, tmp_path, capsys):
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "x", "chosen": "a.png", "rejected": "b.png"}\n' * 4)
    code = cli.main(["train", "configs/tiny_dpo_sd15.yaml",
                     *overrides(tiny_pipelines, tmp_path / "pairs.jsonl", tmp_path / "run", "sd15",
                                "train.max_steps=1")])
    assert code == 2
    err = capsys.readouterr().err
    assert "a.png" in err and "row 0" in err


def test_train_help_lists_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    for key in ("model.pretrained", "data.path", "train.batch_size", "train.mixed_precision", "lora.rank"):
        assert key in text


def test_two_processes_train_as_one_group(tiny_pipelines, toy, tmp_path):
    """torchrun with 2 CPU processes: one gloo group (not two silent single-process runs), with in-training eval."""
    import subprocess
    import sys

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "diffalign.cli", "train",
           "configs/tiny_dpo_sdxl.yaml", *overrides(tiny_pipelines, toy, out, "sdxl", "train.max_steps=2",
                                                    "train.checkpoint_every=2", "eval.every=1",
                                                    "eval.every_prompts=1", "eval.num_steps=2")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2
    assert (out / "checkpoint-2" / "rng_0.pt").is_file() and (out / "checkpoint-2" / "rng_1.pt").is_file()
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()
    # in-training evaluation on the main process only, the other waiting: no hang, no DDP hooks
    assert sorted(p.name for p in (out / "eval").glob("step-*")) == ["step-000000", "step-000001", "step-000002"]


def test_bf16_with_gradient_checkpointing_keeps_lora_in_fp32(tiny_pipelines, toy, tmp_path):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)   # earlier tests in this process fixed the precision to "no"
    cfg = load_config(None, overrides(tiny_pipelines, toy, tmp_path / "run", "sdxl", "train.max_steps=1",
                                      "train.mixed_precision=bf16", "train.gradient_checkpointing=true"))
    seen = []
    try:
        trainer = Trainer(cfg)
        trainer.model.vae.encoder.conv_in.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
        metrics = trainer.train_step(trainer.batches())
    finally:
        AcceleratorState._reset_state(True)   # and later tests expect "no" again
    assert seen == [torch.float32]            # the fp32 VAE ran outside the trainer's bf16 autocast
    unet = unwrap(trainer.model.denoiser)
    assert unet.is_gradient_checkpointing and unet.conv_in.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in trainer.params)
    assert torch.isfinite(metrics["loss"]) and torch.isfinite(metrics["grad_norm"])


def test_write_atomic_leaves_nothing_behind_when_filling_fails(tmp_path):
    from diffalign.checkpoint import write_atomic

    def fill(folder):
        (folder / "half.bin").write_bytes(b"x")
        raise OSError("disk full")

    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "good.bin").write_bytes(b"ok")
    with pytest.raises(OSError, match="disk full"):
        write_atomic(tmp_path / "final", fill)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]            # no .tmp-final left over
    assert [p.name for p in (tmp_path / "final").iterdir()] == ["good.bin"]   # the old one is untouched
    write_atomic(tmp_path / "final", lambda folder: (folder / "new.bin").write_bytes(b"n"))
    assert [p.name for p in (tmp_path / "final").iterdir()] == ["new.bin"]
