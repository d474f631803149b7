"""Methods on the shared core: UNet calls per step, MaPO without a reference, DDIM-InPO's inversion and target."""

import pytest
import torch

from diffalign.config import LoraConfig, ModelConfig, load_config
from diffalign.data.toy import write_toy_pairs
from diffalign.methods.inpo import DDIMInPO
from diffalign.models import load_model
from diffalign.models.base import unwrap
from diffalign.models.lora import add_lora
from diffalign.sampling import invert, sample
from diffalign.trainer import Trainer

TINY = ["train.batch_size=2", "train.lr=1e-3", "train.log_every=1", "train.report_to=none", "train.max_steps=1",
        "data.resolution=64", "data.num_workers=0", "lora.rank=4"]
METHOD_ARGS = {"dpo": ["method.beta=5000"], "mapo": ["method.beta=0.1"], "inpo": ["method.inversion_steps=4"]}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy_pairs(tmp_path_factory.mktemp("toy"), num_pairs=8, size=64)


def make_trainer(tiny_pipelines, toy, out, method, *extra, family="sdxl"):
    cfg = load_config(None, [f"model.pretrained={tiny_pipelines[family]}", f"data.path={toy}", f"output_dir={out}",
                             f"method.name={method}", *METHOD_ARGS[method], *TINY, *extra])
    return Trainer(cfg)


def count_unet_calls(trainer):
    """Rows fed to every UNet in the model (policy, and the frozen copy if any), call by call."""
    calls = []
    for unet in (unwrap(trainer.model.denoiser), trainer.model.ref_denoiser):
        if unet is not None:
            unet.register_forward_pre_hook(lambda m, args, kw: calls.append(kw.get("sample", args[0] if args else None)
                                                                             .shape[0]), with_kwargs=True)
    trainer.train_step(trainer.batches())
    return calls


@pytest.mark.parametrize("lora", ["true", "false"])
def test_unet_calls_per_step(tiny_pipelines, toy, tmp_path, lora):
    """DPO: policy + reference on [w; l]. MaPO: the policy alone, and no reference is built or entered."""
    dpo = make_trainer(tiny_pipelines, toy, tmp_path / "dpo", "dpo", f"lora.enabled={lora}")
    assert count_unet_calls(dpo) == [4, 4]                  # 2 pairs -> 4 rows, twice

    mapo = make_trainer(tiny_pipelines, toy, tmp_path / "mapo", "mapo", f"lora.enabled={lora}")
    assert mapo.model.ref_denoiser is None

    def no_reference():
        raise AssertionError("MaPO entered the reference model")

    mapo.model.reference = no_reference
    assert count_unet_calls(mapo) == [4]


def test_inpo_calls_inversion_then_policy_and_reference(tiny_pipelines, toy, tmp_path):
    trainer = make_trainer(tiny_pipelines, toy, tmp_path / "inpo", "inpo")
    calls = count_unet_calls(trainer)
    assert calls[-2:] == [4, 4]                              # policy and reference on the inverted x_t
    assert 1 <= len(calls) - 2 <= 4                          # at most inversion_steps inversion moves
    assert all(n % 2 == 0 for n in calls[:-2])               # winner and loser of a pair move together


@pytest.fixture(scope="module")
def sd15(tiny_pipelines):
    return load_model(ModelConfig(pretrained=str(tiny_pipelines["sd15"])))


@pytest.fixture(scope="module")
def sd2(tiny_pipelines):
    return load_model(ModelConfig(pretrained=str(tiny_pipelines["sd2"])))


def _latents(model, n=4):
    gen = torch.Generator().manual_seed(0)
    cond = model.encode_prompt(["a red circle", "a blue square"][: n // 2]).repeat(2)
    return torch.randn(n, 4, 8, 8, generator=gen), cond


@pytest.mark.parametrize("family", ["sd15", "sd2"])
def test_inpo_pairs_share_t_and_the_target_round_trips(family, request):
    model = request.getfixturevalue(family)           # sd2 is v-prediction
    x0, cond = _latents(model)
    torch.manual_seed(3)
    pn = DDIMInPO(inversion_steps=10).invert(model, x0, cond)
    assert torch.equal(pn.t[:2], pn.t[2:])
    eps = model.schedule.to_eps(pn.target, pn.x_t, pn.t)    # the target is eps~ (or its v)
    torch.testing.assert_close(model.schedule.add_noise(x0, eps, pn.t), pn.x_t, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(pn.x_t, x0)


def _round_trip_error(model, x0, cond, t, num_steps):
    tt = torch.full((len(x0),), t)
    x_t = invert(model, x0, tt, cond, num_steps, eta=0.0)
    path = model.schedule.inversion_levels(tt, num_steps)[0].tolist()
    back = list(zip(reversed(path[1:]), reversed(path[:-1]), strict=True))      # the same moves, downwards
    with torch.no_grad():
        rec = sample(model, x_t, cond, len(back), steps=back)
    return ((rec - x0).norm() / x0.norm()).item()


@pytest.mark.parametrize("family", ["sd15", "sd2"])
def test_ddim_inversion_then_sampling_reconstructs_x0(family, request):
    """eta = 0: invert to t = 500 and sample back on the same model and grid; the error shrinks with the grid."""
    model = request.getfixturevalue(family)
    x0, cond = _latents(model, 2)
    coarse = _round_trip_error(model, x0, cond, 500, 10)
    fine = _round_trip_error(model, x0, cond, 500, 100)
    # relative L2, measured on the tiny random UNets: sd15 9.1e-2 -> 9.6e-3, sd2 2.0e-1 -> 2.5e-2 (first order)
    assert fine < coarse / 5
    assert fine < 3e-2


def test_inversion_eta_adds_seeded_noise_and_reference_inversion_uses_the_base(sd15):
    import copy

    model = copy.copy(sd15)
    model.denoiser = copy.deepcopy(sd15.denoiser)
    add_lora(model.denoiser, LoraConfig(rank=4))
    with torch.no_grad():
        for name, p in model.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)                      # a policy that differs from the reference
    x0, cond = _latents(model)
    t = torch.tensor([450, 700, 450, 700])
    plain = invert(model, x0, t, cond, 10, eta=0.0)
    noisy = invert(model, x0, t, cond, 10, eta=0.1, generator=torch.Generator().manual_seed(1))
    again = invert(model, x0, t, cond, 10, eta=0.1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(noisy, again) and not torch.allclose(noisy, plain)

    for choice, context in [("policy", None), ("reference", model.reference)]:
        torch.manual_seed(5)
        pn = DDIMInPO(inversion_model=choice, inversion_eta=0.0).invert(model, x0, cond)
        if context is None:
            expected = invert(model, x0, pn.t, cond, 10)
        else:
            with context():
                expected = invert(model, x0, pn.t, cond, 10)
        torch.testing.assert_close(pn.x_t, expected)
    with model.reference():
        base = invert(model, x0, t, cond, 10)
    assert not torch.allclose(base, plain, atol=1e-4)


@pytest.mark.parametrize("config", ["mapo_sd15", "mapo_sdxl", "inpo_sd15", "inpo_sdxl"])
def test_shipped_recipe_trains_end_to_end_from_the_cli(config, tiny_pipelines, toy, tmp_path, capsys):
    """The published recipes (full fine-tuning) through `diffalign train`, pointed at the tiny pipelines."""
    import json

    from diffalign import cli

    family = config.split("_")[1]
    out = tmp_path / "run"
    code = cli.main(["train", f"configs/{config}.yaml", f"model.pretrained={tiny_pipelines[family]}", "model.vae=null",
                     "model.vae_dtype=float32", f"data.path={toy}", f"output_dir={out}", "data.resolution=64",
                     "data.num_workers=0", "train.batch_size=2", "train.grad_accum=1", "train.max_steps=2",
                     "train.mixed_precision=no", "train.report_to=none", "train.log_every=1",
                     "train.checkpoint_every=2", "train.warmup_steps=0"])
    assert code == 0, capsys.readouterr().err[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    keys = {"margin", "ratio_loss"} if config.startswith("mapo") else {"inside", "ref_err_w", "ref_err_l"}
    assert keys | {"loss", "implicit_accuracy", "err_w", "err_l"} <= set(rows[0])
    assert all(map(torch.isfinite, torch.tensor([r["loss"] for r in rows])))
    assert (out / "final" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()


@pytest.mark.parametrize("method", ["dpo", "mapo", "inpo", "alignprop"])
def test_every_method_trains_the_v_prediction_family_from_the_cli(method, tiny_pipelines, toy, tmp_path):
    """SD 2.x (v-prediction): the family the other CLI tests leave out, for every method (sd15, sdxl, sd3 and flux
    are covered in test_train, test_alignprop, the recipe test above and test_flow)."""
    import json

    from diffalign import cli

    out = tmp_path / "run"
    config = "configs/tiny_alignprop_sd15.yaml" if method == "alignprop" else "configs/tiny_dpo_sd15.yaml"
    extra = {"mapo": ["method.beta=0.1"], "inpo": ["method.inversion_steps=4"],
             "alignprop": ["method.num_steps=3", "method.grad_steps=2"]}.get(method, [])
    code = cli.main(["train", config, f"model.pretrained={tiny_pipelines['sd2']}", f"data.path={toy}",
                     f"output_dir={out}", "data.resolution=64", "train.batch_size=2", "train.max_steps=2",
                     f"method.name={method}", *extra])
    assert code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()
