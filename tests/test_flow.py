"""The flow-matching families (SD3 and FLUX.1 architectures, tiny random weights) through the same CLI, trainer
and evaluation."""

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

CONFIGS = {"sd3": "configs/tiny_dpo_sd3.yaml", "flux": "configs/tiny_dpo_flux.yaml"}
CONFIG = CONFIGS["sd3"]
PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy_pairs(tmp_path_factory.mktemp("toy"), num_pairs=8, size=64)


def args(tiny_pipelines, toy, out, *extra, family="sd3"):
    return [f"model.pretrained={tiny_pipelines[family]}", f"data.path={toy}", f"output_dir={out}", *extra]


def steps(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("method", ["dpo", "mapo", "inpo", "alignprop"])
def test_every_method_trains_a_flow_model_from_the_cli(method, family, tiny_pipelines, toy, tmp_path):
    extra = {"dpo": [], "mapo": ["method.beta=0.1"], "inpo": ["method.inversion_steps=4"],
             "alignprop": ["data.prompts=[a red circle, a blue square]", "method.reward=saturation",
                           "method.num_steps=3", "method.grad_steps=2", "method.guidance_scale=3.0"]}[method]
    out = tmp_path / "run"
    config = "configs/tiny_alignprop_sd15.yaml" if method == "alignprop" else CONFIGS[family]   # AlignProp's, on it
    assert cli.main(["train", config, *args(tiny_pipelines, toy, out, f"method.name={method}", "train.max_steps=2",
                                            "train.batch_size=2", "method.eta=0.7", *extra, family=family)]
                    if method == "alignprop" else
                    ["train", config, *args(tiny_pipelines, toy, out, f"method.name={method}", "train.max_steps=2",
                                            "train.batch_size=2", *extra, family=family)]) == 0
    rows = steps(out)
    assert [r["step"] for r in rows] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    keys = load_file(out / "final" / "pytorch_lora_weights.safetensors")
    assert keys and all(k.startswith("transformer.") for k in keys)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_flow_lora_loads_in_its_pipeline_and_resume_is_exact(family, tiny_pipelines, toy, tmp_path):
    import diffusers

    config = CONFIGS[family]
    straight, resumed = tmp_path / "a", tmp_path / "b"
    common = ["train.checkpoint_every=2"]
    run = lambda out, *extra: cli.main(["train", config, *args(tiny_pipelines, toy, out, *common, *extra,
                                                                family=family)])
    assert run(straight, "train.max_steps=4") == 0
    assert run(resumed, "train.max_steps=2") == 0
    assert run(resumed, "train.max_steps=4", "train.resume=latest") == 0
    a = load_file(straight / "final" / "pytorch_lora_weights.safetensors")
    b = load_file(resumed / "final" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # our policy with the LoRA == the pipeline's transformer after load_lora_weights
    cfg = load_config(config, args(tiny_pipelines, toy, tmp_path / "c", family=family))
    trainer = Trainer(cfg)
    load_lora(trainer.model, straight / "final")
    model = trainer.model
    x = torch.randn(model.latent_shape(2, (64, 64)), generator=torch.Generator().manual_seed(0))
    cond = model.sampling_cond(["a red circle", "a blue square"], (64, 64))
    level = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        policy = model.predict(x, level, cond)
    pipe = getattr(diffusers, PIPELINES[family]).from_pretrained(str(tiny_pipelines[family]))
    timestep = model.schedule.timestep(level)      # the pipeline's transformer, through the family's own call
    with torch.no_grad():
        base = model._call_denoiser(pipe.transformer, x, timestep, cond)
        pipe.load_lora_weights(str(straight / "final"))
        tuned = model._call_denoiser(pipe.transformer, x, timestep, cond)
    torch.testing.assert_close(tuned, policy, atol=1e-5, rtol=1e-4)
    assert (tuned - base).abs().max() > 1e-4


@pytest.mark.parametrize("family, network", [("sd3", "SD3Transformer2DModel"), ("flux", "FluxTransformer2DModel")])
def test_full_fine_tuning_saves_a_loadable_transformer(family, network, tiny_pipelines, toy, tmp_path):
    import diffusers

    out = tmp_path / "run"
    assert cli.main(["train", CONFIGS[family], *args(tiny_pipelines, toy, out, "lora.enabled=false", "train.lr=1e-4",
                                                     "train.max_steps=2", family=family)]) == 0
    cls = getattr(diffusers, network)
    saved = cls.from_pretrained(out / "final" / "transformer")
    base = cls.from_pretrained(tiny_pipelines[family], subfolder="transformer")
    assert any(not torch.equal(p, q) for p, q in zip(saved.parameters(), base.parameters(), strict=True))


@pytest.mark.parametrize("family, guidance, negative", [("sd3", 7.0, ""), ("sd3", 1.0, ""), ("sd3", 4.5, "blurry"),
                                                        ("flux", 3.5, ""), ("flux", 1.0, "")])
def test_sampling_equals_the_pipeline(family, guidance, negative, tiny_pipelines):
    """SD3: real CFG with the negative prompt; FLUX.1: the scale is the embedded guidance (no second branch) and
    the grid is FluxPipeline's, shifted for the image's token count."""
    import diffusers

    path = str(tiny_pipelines[family])
    model = load_model(ModelConfig(pretrained=path))
    ours = generate(model, make_scheduler(model, "pipeline"), ["a red circle", "a blue square"], [3, 4], (64, 64),
                    4, guidance, negative_prompt=negative)
    pipe = getattr(diffusers, PIPELINES[family]).from_pretrained(path)
    kwargs = {"negative_prompt": [negative] * 2} if negative else {}
    theirs = pipe(["a red circle", "a blue square"], num_inference_steps=4, height=64, width=64,
                  guidance_scale=guidance, output_type="pt", **kwargs,
                  generator=[torch.Generator().manual_seed(s) for s in (3, 4)]).images       # one batch, as ours
    assert family != "flux" or model.guidance == 3.5                   # FLUX: the training value is restored
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


@pytest.mark.parametrize("family, text_stream", [("sd15", False), ("sd3", True), ("flux", True)])
def test_unset_lora_targets_are_the_familys_and_reach_the_text_stream_of_joint_attention(family, text_stream,
                                                                                        tiny_pipelines):
    """The flow toy barely moved with adapters on the image stream only (README, Measured): on SD3 and FLUX an
    unset lora.target_modules covers add_q/k/v_proj and to_add_out too, and the run's config records the list."""
    from diffalign.trainer import make_trainable

    cfg = load_config(None, [f"model.pretrained={tiny_pipelines[family]}", "data.path=unused"])
    assert cfg.lora.target_modules is None
    model = load_model(cfg.model)
    make_trainable(model, cfg, needs_reference=True)
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.denoiser.named_parameters() if "lora_A" in n}
    assert cfg.lora.target_modules == list(model.lora_targets)
    assert {"to_q", "to_k", "to_v"} <= adapted
    assert ({"add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"} <= adapted) == text_stream
