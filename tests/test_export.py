"""``diffalign export``: kohya-format LoRA files that ComfyUI's key map names and diffusers' loader reads back to the
same denoiser outputs as the diffusers-format file (and the alpha / rank scale honoured)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffalign.config import LoraConfig, ModelConfig
from diffalign.export import (
    ExportError,
    comfyui_lora_keys,
    diffusers_to_native,
    export_lora,
    kohya_name,
    lora_modules,
    to_kohya,
)
from diffalign.models import load_model
from diffalign.models.lora import WEIGHTS_NAME, add_lora, load_lora, save_lora

RANK, ALPHA = 4, 2.0          # alpha != rank: the loaders must scale by alpha / r = 0.5
TARGETS = {"sd15": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                    "conv1", "conv2", "time_emb_proj"],
           "sdxl": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv2", "time_emb_proj"],
           "sd3": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "to_add_out"],
           "flux": ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj"]}
DIFFUSERS_READS_KOHYA = ("sd15", "sdxl", "flux")   # diffusers 0.42 has no kohya reader for SD3


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is ~100x faster than several contending for shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def loras(one_thread, tiny_pipelines, tmp_path_factory):
    """{family: (pipeline path, LoRA folder)}: LoRAs with random non-zero A and B, saved as diffalign saves them."""
    root = tmp_path_factory.mktemp("loras")
    gen = torch.Generator().manual_seed(0)
    out = {}
    for family in TARGETS:
        model = load_model(ModelConfig(pretrained=str(tiny_pipelines[family])))
        params = add_lora(model.denoiser, LoraConfig(rank=RANK, alpha=ALPHA, target_modules=TARGETS[family]))
        with torch.no_grad():
            for p in params:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        save_lora(model, root / family)
        out[family] = (tiny_pipelines[family], root / family)
    return out


def _inputs(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    size = (32, 32)                  # tiny latents: a denoiser call takes milliseconds
    x = torch.randn(model.latent_shape(2, size), generator=gen)
    return x, model.schedule.sample_t(2, generator=gen), model.sampling_cond(["a red circle", "a blue square"], size)


@torch.no_grad()
def _predict(model, inputs):
    x, t, cond = inputs
    return model.predict(x, t, cond)


def _policy(pipeline, folder, family):
    """The trained policy: the tiny model with diffalign's adapter and the saved LoRA loaded into it."""
    model = load_model(ModelConfig(pretrained=str(pipeline)))
    add_lora(model.denoiser, LoraConfig(rank=RANK, alpha=ALPHA, target_modules=TARGETS[family]))
    load_lora(model, folder)
    return model


def _module_names(kohya: dict) -> set[str]:
    return {re.sub(r"\.(lora_down\.weight|lora_up\.weight|alpha)$", "", k) for k in kohya}


@pytest.mark.parametrize("family", list(TARGETS))
def test_every_kohya_name_is_one_comfyui_maps(family, loras):
    pipeline, folder = loras[family]
    written = export_lora(folder)["kohya"]
    assert written == folder / f"{folder.name}_kohya.safetensors"
    kohya = load_file(written)
    modules = lora_modules(load_file(folder / WEIGHTS_NAME), family)
    names = _module_names(kohya)
    assert len(names) == len(modules) and len(kohya) == 3 * len(modules)
    config = json.loads((pipeline / ("unet" if family in ("sd15", "sdxl") else "transformer") / "config.json")
                        .read_text())
    key_map, native = comfyui_lora_keys(family, config), diffusers_to_native(family, config)
    for module, pair in modules.items():
        name = kohya_name(module, family)
        assert name in key_map, f"ComfyUI maps no LoRA named {name}"
        expected = native[f"{module}.weight"]       # the native weight the diffusers module is
        expected = (f"diffusion_model.{expected[0]}", expected[1]) if isinstance(expected, tuple) else \
            f"diffusion_model.{expected}"
        assert key_map[name] == expected
        assert torch.equal(kohya[f"{name}.lora_down.weight"], pair["down"])
        assert torch.equal(kohya[f"{name}.lora_up.weight"], pair["up"])
        assert kohya[f"{name}.alpha"].dim() == 0 and kohya[f"{name}.alpha"].item() == ALPHA


@pytest.mark.parametrize("family", DIFFUSERS_READS_KOHYA)
def test_diffusers_reads_the_kohya_file_as_the_diffusers_file(family, loras):
    """pipe.load_lora_weights(kohya file) == the trained policy (the diffusers file loaded into diffalign's
    adapter) != no LoRA; and the kohya alpha is what scales it (the same file with alpha = rank differs)."""
    pipeline, folder = loras[family]
    kohya_file = export_lora(folder)["kohya"]
    model = load_model(ModelConfig(pretrained=str(pipeline)))
    pipe = model.pipeline_class().from_pretrained(str(pipeline))
    model.denoiser = getattr(pipe, model.denoiser_folder)
    inputs = _inputs(model)
    base = _predict(model, inputs)

    def with_lora(path, weight_name):
        name = weight_name.removesuffix(".safetensors")    # a fresh adapter name each time
        pipe.load_lora_weights(str(path), weight_name=weight_name, adapter_name=name, local_files_only=True)
        try:
            return _predict(model, inputs)
        finally:
            pipe.delete_adapters(name)

    ours = _predict(_policy(pipeline, folder, family), inputs)
    theirs = with_lora(kohya_file.parent, kohya_file.name)
    assert (ours - base).abs().max() > 1e-3                    # the LoRA changes the output
    assert (theirs - ours).abs().max() < 1e-5
    torch.testing.assert_close(_predict(model, inputs), base)   # adapters removed again

    wrong = {k: (torch.tensor(float(RANK)) if k.endswith(".alpha") else v) for k, v in load_file(kohya_file).items()}
    save_file(wrong, str(folder.parent / f"{family}_alpha_is_rank.safetensors"))
    unscaled = with_lora(folder.parent, f"{family}_alpha_is_rank.safetensors")
    assert (unscaled - ours).abs().max() > 1e-4                # alpha / r is honoured, not ignored


@pytest.mark.parametrize("family", list(TARGETS))
@torch.no_grad()
def test_comfyui_lora_math_on_the_kohya_file_matches_peft(family, loras):
    """W += alpha / r * up @ down per kohya module (ComfyUI's and A1111's patch) gives the peft-loaded outputs;
    this covers SD3, for which diffusers has no kohya reader."""
    pipeline, folder = loras[family]
    kohya = load_file(export_lora(folder)["kohya"])
    model = load_model(ModelConfig(pretrained=str(pipeline)))
    inputs = _inputs(model, seed=1)
    base = _predict(model, inputs)
    ours = _predict(_policy(pipeline, folder, family), inputs)
    patched = 0
    for path, module in model.denoiser.named_modules():
        name = kohya_name(path, family)
        if f"{name}.alpha" in kohya:
            down, up = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"]
            delta = (up.flatten(1) @ down.flatten(1)) * (kohya[f"{name}.alpha"] / down.shape[0])
            module.weight += delta.reshape(module.weight.shape)
            patched += 1
    assert patched == len(_module_names(kohya))
    patched_out = _predict(model, inputs)
    assert (ours - base).abs().max() > 1e-3
    assert (patched_out - ours).abs().max() < 1e-5


def test_to_kohya_takes_per_module_alphas_and_both_key_spellings():
    a, b = torch.randn(2, 8), torch.randn(6, 2)
    state = {"transformer.blocks.0.attn.to_q.lora_A.weight": a, "transformer.blocks.0.attn.to_q.lora_B.weight": b,
             "transformer.blocks.0.attn.to_k.lora.down.weight": a, "transformer.blocks.0.attn.to_k.lora.up.weight": b}
    out = to_kohya(state, {"blocks.0.attn.to_q": 1.0, "blocks.0.attn.to_k": 3.0}, "sd3", dtype=torch.float16)
    assert out["lora_transformer_blocks_0_attn_to_q.alpha"].item() == 1.0
    assert out["lora_transformer_blocks_0_attn_to_k.alpha"].item() == 3.0
    assert out["lora_transformer_blocks_0_attn_to_k.lora_up.weight"].dtype == torch.float16
    with pytest.raises(ExportError, match="no alpha"):
        to_kohya(state, {"blocks.0.attn.to_q": 1.0}, "sd3")
    with pytest.raises(ExportError, match="only its down"):
        to_kohya({"unet.a.lora_A.weight": a}, 1.0, "sd15")


def _unet_config(**kw):
    base = {"down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "layers_per_block": 2,
            "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768, "attention_head_dim": 8}
    return {**base, **kw}


SDXL_UNET = _unet_config(down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                         up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                         block_out_channels=[320, 640, 1280], transformer_layers_per_block=[1, 2, 10],
                         attention_head_dim=[5, 10, 20], cross_attention_dim=2048, use_linear_projection=True,
                         addition_embed_type="text_time", addition_time_embed_dim=256,
                         projection_class_embeddings_input_dim=2816)


def _a1111_compvis(name: str) -> str | None:
    """A1111's convert_diffusers_name_to_compvis for attention layers (SD 1.x layout: 2 resnets per block)."""
    for pattern, fmt in ((r"lora_unet_down_blocks_(\d+)_attentions_(\d+)_(.+)",
                          lambda b, i, r: f"input_blocks_{1 + 3 * int(b) + int(i)}_1_{r}"),
                         (r"lora_unet_up_blocks_(\d+)_attentions_(\d+)_(.+)",
                          lambda b, i, r: f"output_blocks_{3 * int(b) + int(i)}_1_{r}"),
                         (r"lora_unet_mid_block_attentions_0_(.+)", lambda r: f"middle_block_1_{r}")):
        m = re.fullmatch(pattern, name)
        if m:
            return "diffusion_model_" + fmt(*m.groups())
    return None


@pytest.mark.parametrize(("family", "config"), [("sd15", _unet_config()), ("sdxl", SDXL_UNET)])
def test_full_size_unet_names_map_in_comfyui_and_a1111(family, config):
    """Every Linear / Conv2d of the real SD 1.5 and SDXL UNets (built empty): its kohya name is in ComfyUI's key
    map, and for attention layers ComfyUI's target is the SGM layer A1111's converter names."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel(**config)
    key_map = comfyui_lora_keys(family, config)
    layers = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert len(layers) > 250
    checked = 0
    for path in layers:
        name = kohya_name(path, family)
        assert name in key_map, name
        compvis = _a1111_compvis(name)
        if compvis is not None:
            assert key_map[name].removesuffix(".weight").replace(".", "_") == compvis
            checked += 1
    assert checked > 100
    if family == "sdxl":           # well-known SGM names of SDXL checkpoints
        assert key_map["lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k"] == \
            "diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight"
        assert key_map["lora_unet_up_blocks_0_upsamplers_0_conv"] == "diffusion_model.output_blocks.2.2.conv.weight"


def test_merge_into_writes_the_merged_denoiser(loras, tmp_path):
    from diffusers import UNet2DConditionModel

    pipeline, folder = loras["sd15"]
    written = export_lora(folder, tmp_path / "out", merge_into=pipeline)
    assert written["kohya"] == tmp_path / "out" / f"{folder.name}_kohya.safetensors"
    merged_dir = written["merged"]
    assert (merged_dir / "diffusion_pytorch_model.safetensors").is_file()
    assert not [p for p in merged_dir.parent.iterdir() if p.name.endswith(".tmp")]
    model = _policy(pipeline, folder, "sd15")
    inputs = _inputs(model, seed=2)
    ours = _predict(model, inputs)
    model.denoiser = UNet2DConditionModel.from_pretrained(merged_dir).eval()
    assert (_predict(model, inputs) - ours).abs().max() < 1e-5


def test_cli_and_clear_errors(loras, tmp_path, capsys):
    from diffalign import cli

    _, folder = loras["flux"]
    run_dir = tmp_path / "myrun"
    (run_dir / "final").mkdir(parents=True)
    (run_dir / "final" / WEIGHTS_NAME).write_bytes((folder / WEIGHTS_NAME).read_bytes())
    assert cli.main(["export", str(run_dir), "--out", str(tmp_path / "x")]) == 0
    assert (tmp_path / "x" / "myrun_kohya.safetensors").is_file()
    meta = __import__("safetensors").safe_open(str(tmp_path / "x" / "myrun_kohya.safetensors"), "pt").metadata()
    assert meta["ss_network_dim"] == str(RANK) and meta["ss_network_alpha"] == "2"
    assert meta["ss_base_model_version"] == "flux1"

    assert cli.main(["export", str(tmp_path / "x" / "myrun_kohya.safetensors")]) == 2
    assert "already a kohya-format LoRA" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ExportError, match=f"{empty}: not a diffalign LoRA"):
        export_lora(empty)
    save_file({"text_encoder.x.lora_A.weight": torch.zeros(1, 2)}, str(empty / WEIGHTS_NAME))
    with pytest.raises(ExportError, match=rf"{empty / WEIGHTS_NAME}: not a diffalign LoRA"):
        export_lora(empty)


def test_diffusers_format_file_with_wide_targets_loads_fully(loras):
    """Every module of a LoRA on attention AND other layers loads through diffusers' loader (the file once mixed
    `.lora.down` and `.lora_A` spellings, and diffusers, deciding from the first key, dropped the attention ones)."""
    from diffusers import StableDiffusionPipeline

    pipeline, folder = loras["sd15"]
    pipe = StableDiffusionPipeline.from_pretrained(str(pipeline))
    pipe.load_lora_weights(str(folder), adapter_name="d", local_files_only=True)
    loaded = sum(1 for m in pipe.unet.modules() if "d" in getattr(m, "lora_A", {}))
    assert loaded == len(lora_modules(load_file(folder / WEIGHTS_NAME), "sd15"))
