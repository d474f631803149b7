"""The flow-matching family (SD3 architecture, tiny random weights) through the same CLI, trainer and evaluation."""

import json

import pytest
import torch
from safetensors.torch import load_file

from diffalign import cli
from diffalign.config import ModelConfig, load_config
from diffalign.data.toy import write_toy_pairs
from diffalign.eval.generate import generate, make_scheduler
from diffalign.models import load_model
from diffalign.models.lora import load_lora
from diffalign.trainer import Trainer

CONFIG = "configs/tiny_dpo_sd3.yaml"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy_pairs(tmp_path_factory.mktemp("toy"), num_pairs=8, size=64)


def args(tiny_pipelines, toy, out, *extra):
    return [f"model.pretrained={tiny_pipelines['sd3']}", f"data.path={toy}", f"output_dir={out}", *extra]


def steps(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["dpo", "mapo", "inpo", "alignprop"])
def test_every_method_trains_a_flow_model_from_the_cli(method, tiny_pipelines, toy, tmp_path):
    extra = {"dpo": [], "mapo": ["method.beta=0.1"], "inpo": ["method.inversion_steps=4"],
             "alignprop": ["data.prompts=[a red circle, a blue square]", "method.reward=saturation",
                           "method.num_steps=3", "method.grad_steps=2", "method.guidance_scale=3.0"]}[method]
    out = tmp_path / "run"
    config = "configs/tiny_alignprop_sd15.yaml" if method == "alignprop" else CONFIG   # the same, on sd3
    assert cli.main(["train", config, *args(tiny_pipelines, toy, out, f"method.name={method}",
                                            "train.max_steps=2", "train.batch_size=2", *extra)]) == 0
    rows = steps(out)
    assert [r["step"] for r in rows] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    keys = load_file(out / "final" / "pytorch_lora_weights.safetensors")
    assert keys and all(k.startswith("transformer.") for k in keys)


def test_a_flow_lora_loads_in_the_sd3_pipeline_and_resume_is_exact(tiny_pipelines, toy, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    straight, resumed = tmp_path / "a", tmp_path / "b"
    common = ["train.checkpoint_every=2"]
    assert cli.main(["train", CONFIG, *args(tiny_pipelines, toy, straight, *common, "train.max_steps=4")]) == 0
    assert cli.main(["train", CONFIG, *args(tiny_pipelines, toy, resumed, *common, "train.max_steps=2")]) == 0
    assert cli.main(["train", CONFIG, *args(tiny_pipelines, toy, resumed, *common, "train.max_steps=4",
                                            "train.resume=latest")]) == 0
    a = load_file(straight / "final" / "pytorch_lora_weights.safetensors")
    b = load_file(resumed / "final" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # our policy with the LoRA == the pipeline's transformer after load_lora_weights
    cfg = load_config(CONFIG, args(tiny_pipelines, toy, tmp_path / "c"))
    trainer = Trainer(cfg)
    load_lora(trainer.model, straight / "final")
    model = trainer.model
    x = torch.randn(model.latent_shape(2, (64, 64)), generator=torch.Generator().manual_seed(0))
    cond = model.sampling_cond(["a red circle", "a blue square"], (64, 64))
    level = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        policy = model.predict(x, level, cond)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_pipelines["sd3"]))
    call = dict(hidden_states=x, timestep=level * 1000, encoder_hidden_states=cond.hidden,
                pooled_projections=cond.pooled)
    with torch.no_grad():
        base = pipe.transformer(**call).sample
        pipe.load_lora_weights(str(straight / "final"))
        tuned = pipe.transformer(**call).sample
    torch.testing.assert_close(tuned, policy, atol=1e-5, rtol=1e-4)
    assert (tuned - base).abs().max() > 1e-4


def test_full_fine_tuning_saves_a_loadable_transformer(tiny_pipelines, toy, tmp_path):
    from diffusers import SD3Transformer2DModel

    out = tmp_path / "run"
    assert cli.main(["train", CONFIG, *args(tiny_pipelines, toy, out, "lora.enabled=false", "train.lr=1e-4",
                                            "train.max_steps=2")]) == 0
    saved = SD3Transformer2DModel.from_pretrained(out / "final" / "transformer")
    base = SD3Transformer2DModel.from_pretrained(tiny_pipelines["sd3"], subfolder="transformer")
    assert any(not torch.equal(p, q) for p, q in zip(saved.parameters(), base.parameters(), strict=True))


@pytest.mark.parametrize("guidance, negative", [(7.0, ""), (1.0, ""), (4.5, "blurry")])
def test_sampling_equals_the_sd3_pipeline(guidance, negative, tiny_pipelines):
    from diffusers import StableDiffusion3Pipeline

    path = str(tiny_pipelines["sd3"])
    model = load_model(ModelConfig(pretrained=path))
    ours = generate(model, make_scheduler(model, "pipeline"), ["a red circle", "a blue square"], [3, 4], (64, 64),
                    4, guidance, negative_prompt=negative)
    pipe = StableDiffusion3Pipeline.from_pretrained(path)
    theirs = pipe(["a red circle", "a blue square"], negative_prompt=[negative] * 2 if negative else None,
                  num_inference_steps=4, height=64, width=64, guidance_scale=guidance, output_type="pt",
                  generator=[torch.Generator().manual_seed(s) for s in (3, 4)]).images       # one batch, as ours
    assert (ours - theirs).abs().max().item() == 0.0


def test_ddim_is_refused_for_a_flow_model(tiny_pipelines):
    from diffalign.config import ConfigError

    model = load_model(ModelConfig(pretrained=str(tiny_pipelines["sd3"])), denoiser=False)
    with pytest.raises(ConfigError, match="set eval.scheduler=pipeline"):
        make_scheduler(model, "ddim")


def test_timestep_sampling_is_an_option_of_flow_models_only(tiny_pipelines, toy, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", CONFIG, *args(tiny_pipelines, toy, out, "train.timestep_sampling=logit_normal",
                                            "train.max_steps=1")]) == 0
    capsys.readouterr()
    vp = [f"model.pretrained={tiny_pipelines['sd15']}", f"data.path={toy}", f"output_dir={tmp_path / 'vp'}",
          "train.timestep_sampling=logit_normal", "train.max_steps=1"]
    assert cli.main(["train", "configs/tiny_dpo_sd15.yaml", *vp]) == 2
    assert "for flow-matching models" in capsys.readouterr().err
