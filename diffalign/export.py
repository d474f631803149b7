"""``diffalign export``: a trained LoRA in the kohya key format that ComfyUI, A1111/Forge and diffusers read.

diffalign saves LoRA in the diffusers format (``pytorch_lora_weights.safetensors``: keys ``unet.<module>.lora.down
.weight`` / ``lora_A``, SD3 and FLUX with the prefix ``transformer.``, rank and alpha in the file's
``lora_adapter_metadata``). The kohya format writes, per adapted module, three tensors::

    <name>.lora_down.weight   = lora_A  [r, in]
    <name>.lora_up.weight     = lora_B  [out, r]
    <name>.alpha              = alpha   (0-dim; the loaders scale up @ down by alpha / r)

with ``<name>`` = a prefix + the diffusers module path, dots replaced by ``_``:

* SD 1.x/2.x and SDXL: ``lora_unet_`` + the diffusers UNet path (``lora_unet_down_blocks_1_attentions_0_...``).
  ComfyUI maps these names for every UNet through ``comfy.utils.unet_to_diffusers`` (``model_lora_keys_unet``),
  A1111 through ``convert_diffusers_name_to_compvis``, and diffusers reads them directly
  (``_convert_non_diffusers_lora_to_diffusers``). The SGM spelling (``lora_unet_input_blocks_4_1_...``, what
  kohya's SDXL trainer writes) is accepted by all three too, but needs the block table of the exact UNet; the
  diffusers spelling does not, so it is the one written.
* SD3 and FLUX: ``lora_transformer_`` + the diffusers transformer path (OneTrainer's naming), which ComfyUI maps
  through ``mmdit_to_diffusers`` / ``flux_to_diffusers``. diffusers reads it for FLUX attention layers
  (``_convert_kohya_flux_lora_to_diffusers``, its "mixture" branch); diffusers has no kohya reader for SD3.

:func:`comfyui_lora_keys` rebuilds, in this project's own code, the key table ComfyUI's loader uses for an
architecture (kohya name -> the model weight it patches), so that names can be checked without ComfyUI.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger("diffalign")

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
FAMILIES = ("sd15", "sdxl", "sd3", "flux")
KOHYA_PREFIX = {"sd15": "lora_unet_", "sdxl": "lora_unet_", "sd3": "lora_transformer_", "flux": "lora_transformer_"}
DENOISER_PREFIX = {"sd15": "unet", "sdxl": "unet", "sd3": "transformer", "flux": "transformer"}
BASE_MODEL_HINT = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0", "sd3": "sd3", "flux": "flux1"}
PIPELINE_FAMILY = {"StableDiffusionPipeline": "sd15", "StableDiffusionXLPipeline": "sdxl",
                   "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
FLUX_DIFFUSERS_READS = re.compile(r"^(single_)?transformer_blocks\.\d+\.attn\.(to_[qkv]|to_out\.0|add_[qkv]_proj|"
                                  r"to_add_out)$")   # what diffusers' reader of lora_transformer_ FLUX files maps

# peft / diffusers spellings of the two LoRA matrices -> ("down" = A, "up" = B)
_SUFFIXES = ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora.down.weight", "down"),
             (".lora.up.weight", "up"), (".lora_down.weight", "down"), (".lora_up.weight", "up"))


class ExportError(ValueError):
    """The input is not a diffalign LoRA, or cannot be written in the kohya format."""


# ----------------------------------------------------------------------------------------------- conversion
def split_lora_key(key: str) -> tuple[str, str] | None:
    """``unet.a.b.lora_A.weight`` -> (``unet.a.b``, "down"); None for a key that is not a LoRA matrix."""
    for suffix, kind in _SUFFIXES:
        if key.endswith(suffix):
            return key[:-len(suffix)], kind
    return None


def lora_modules(state_dict: Mapping[str, Tensor], family: str) -> dict[str, dict[str, Tensor]]:
    """{diffusers module path (no ``unet.`` / ``transformer.`` prefix): {"down": A, "up": B}}."""
    prefix = DENOISER_PREFIX[_check_family(family)] + "."
    modules: dict[str, dict[str, Tensor]] = {}
    foreign = []
    for key, tensor in state_dict.items():
        parts = split_lora_key(key)
        if parts is None:
            foreign.append(key)
            continue
        module, kind = parts
        modules.setdefault(module.removeprefix(prefix), {})[kind] = tensor
    if foreign:
        raise ExportError(f"{len(foreign)} keys are not LoRA A/B matrices (DoRA, biases or a text encoder are not "
                          f"supported), e.g. {foreign[:3]}")
    for module, pair in modules.items():
        if set(pair) != {"down", "up"}:
            raise ExportError(f"module {module}: has only its {'/'.join(pair)} matrix")
        if pair["down"].shape[0] != pair["up"].shape[1]:
            raise ExportError(f"module {module}: down {tuple(pair['down'].shape)} and up {tuple(pair['up'].shape)} "
                              "disagree on the rank")
    return modules


def kohya_name(module: str, family: str) -> str:
    """The kohya module name: the family's prefix + the diffusers path with ``.`` -> ``_``."""
    return KOHYA_PREFIX[_check_family(family)] + module.replace(".", "_")


def to_kohya(state_dict: Mapping[str, Tensor], alpha: float | Mapping[str, float], family: str,
             dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """diffusers/peft LoRA tensors -> kohya keys (``.lora_down.weight``, ``.lora_up.weight``, 0-dim ``.alpha``).

    ``alpha`` is peft's ``lora_alpha`` (scale alpha / r), or {diffusers module path: alpha} per module (a module
    missing there is an error). ``dtype`` converts the matrices (default: kept); alpha is always float32.
    """
    modules = lora_modules(state_dict, family)
    if not modules:
        raise ExportError("no LoRA modules in the state dict")
    out: dict[str, Tensor] = {}
    for module, pair in sorted(modules.items()):
        if isinstance(alpha, Mapping):
            if module not in alpha:
                raise ExportError(f"module {module}: no alpha given")
            value = float(alpha[module])
        else:
            value = float(alpha)
        name = kohya_name(module, family)
        if name in out or f"{name}.alpha" in out:
            raise ExportError(f"two modules have the kohya name {name}")
        down, up = pair["down"], pair["up"]
        if dtype is not None:
            down, up = down.to(dtype), up.to(dtype)
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(value, dtype=torch.float32)
    return out


def module_alphas(modules: Mapping[str, Mapping[str, Tensor]], config: Mapping[str, Any]) -> dict[str, float]:
    """Per-module kohya alpha from a peft LoRA config (``r``, ``lora_alpha``, ``alpha_pattern``, ``rank_pattern``,
    ``use_rslora``): kohya scales by alpha / r with r the tensor's rank, peft by lora_alpha / r (or / sqrt(r))."""
    if config.get("use_dora"):
        raise ExportError("DoRA adapters have no kohya LoRA equivalent")
    base = config.get("lora_alpha")
    if base is None:
        raise ExportError("the LoRA config has no lora_alpha")
    patterns = dict(config.get("alpha_pattern") or {})
    alphas = {}
    for module, pair in modules.items():
        value = float(base)
        for pattern, pattern_alpha in patterns.items():      # peft matches the key's end: (.*\.)?pattern$
            if re.fullmatch(rf"(.*\.)?{pattern}", module):
                value = float(pattern_alpha)
                break
        rank = pair["down"].shape[0]
        if config.get("use_rslora"):
            value = value * rank ** 0.5                        # alpha' / r == alpha / sqrt(r)
        alphas[module] = value
    return alphas


# ----------------------------------------------------------------------------------------------- ComfyUI key map
_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
           "conv_shortcut": "skip_connection"}
_ATTENTION = ("proj_in", "proj_out")
_BLOCK = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
          "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
_UNET_BASIC = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
               "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
               "add_embedding.linear_2": "label_emb.0.2", "class_embedding.linear_1": "label_emb.0.0",
               "class_embedding.linear_2": "label_emb.0.2"}


def _resnet(out: dict[str, str], src: str, dst: str) -> None:
    for d, s in _RESNET.items():
        out[f"{src}.{d}.weight"] = f"{dst}.{s}.weight"


def _attention(out: dict[str, str], src: str, dst: str, n_blocks: int) -> None:
    for name in _ATTENTION:
        out[f"{src}.{name}.weight"] = f"{dst}.{name}.weight"
    for t in range(n_blocks):
        for name in _BLOCK:
            out[f"{src}.transformer_blocks.{t}.{name}.weight"] = f"{dst}.transformer_blocks.{t}.{name}.weight"


def _per_level(value: Any, levels: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


def _down_blocks(out: dict[str, str], res: list, depth: list, has_attn: list) -> None:
    for level in range(len(res)):
        n = 1 + (res[level] + 1) * level
        for i in range(res[level]):
            _resnet(out, f"down_blocks.{level}.resnets.{i}", f"input_blocks.{n + i}.0")
            if has_attn[level]:
                _attention(out, f"down_blocks.{level}.attentions.{i}", f"input_blocks.{n + i}.1", depth[level])
        if level < len(res) - 1:
            out[f"down_blocks.{level}.downsamplers.0.conv.weight"] = f"input_blocks.{n + res[level]}.0.op.weight"


def _up_blocks(out: dict[str, str], res: list, depth: list, has_attn: list) -> None:
    """Up blocks run from the lowest resolution: ``res``, ``depth``, ``has_attn`` are given in that order."""
    for level in range(len(res)):
        n = (res[level] + 1) * level
        for i in range(res[level] + 1):
            _resnet(out, f"up_blocks.{level}.resnets.{i}", f"output_blocks.{n + i}.0")
            if has_attn[level]:
                _attention(out, f"up_blocks.{level}.attentions.{i}", f"output_blocks.{n + i}.1", depth[level])
        if level < len(res) - 1:
            slot = 2 if has_attn[level] else 1
            out[f"up_blocks.{level}.upsamplers.0.conv.weight"] = f"output_blocks.{n + res[level]}.{slot}.conv.weight"


def _unet_sgm_map(unet_config: Mapping[str, Any]) -> dict[str, str]:
    """{diffusers UNet weight key: SGM/LDM weight key} for the parameters a LoRA can patch (linear / conv
    weights), for a diffusers ``UNet2DConditionModel`` config. The block arithmetic is the LDM layout that
    ComfyUI's ``unet_to_diffusers`` walks: input block n = 1 + (res+1)*level + i (resnet .0, attention .1),
    downsampler input block 1 + (res+1)*level + res (.0.op); middle block 0/2 resnets, 1 attention; output block
    (res+1)*level + i (resnet .0, attention .1, upsampler .1 or .2 after an attention)."""
    downs = list(unet_config["down_block_types"])
    levels = len(downs)
    res = _per_level(unet_config["layers_per_block"], levels)
    depth = _per_level(unet_config.get("transformer_layers_per_block", 1), levels)
    has_attn = ["CrossAttn" in t for t in downs]
    out: dict[str, str] = {}
    _down_blocks(out, res, depth, has_attn)
    mid = unet_config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid is not None:
        if "CrossAttn" in mid:
            _attention(out, "mid_block.attentions.0", "middle_block.1", depth[-1])
        for i, n in enumerate((0, 2)):
            _resnet(out, f"mid_block.resnets.{i}", f"middle_block.{n}")
    _up_blocks(out, res[::-1], depth[::-1], has_attn[::-1])
    for d, s in _UNET_BASIC.items():
        out[f"{d}.weight"] = f"{s}.weight"
    return out


def _qkv(diffusers: str, fused: str, index: int, size: int) -> dict[str, tuple[str, tuple[int, int, int]]]:
    return {diffusers: (fused, (0, index * size, size))}


def _mmdit_map(config: Mapping[str, Any]) -> dict[str, Any]:
    """{diffusers SD3 transformer weight key: MMDiT weight key (or (fused qkv key, (dim, offset, size)))}, the
    linear weights ComfyUI's ``mmdit_to_diffusers`` lists (joint blocks only: no SD3.5 ``attn2``)."""
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    out: dict[str, Any] = {}
    for i in range(config["num_layers"]):
        src, dst = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        for j, q in enumerate("qkv"):
            out.update(_qkv(f"{src}.attn.to_{q}.weight", f"{dst}.x_block.attn.qkv.weight", j, hidden))
            out.update(_qkv(f"{src}.attn.add_{q}_proj.weight", f"{dst}.context_block.attn.qkv.weight", j, hidden))
        for d, s in {"norm1_context.linear": "context_block.adaLN_modulation.1", "attn.to_add_out":
                     "context_block.attn.proj", "ff_context.net.0.proj": "context_block.mlp.fc1",
                     "ff_context.net.2": "context_block.mlp.fc2", "norm1.linear": "x_block.adaLN_modulation.1",
                     "attn.to_out.0": "x_block.attn.proj", "ff.net.0.proj": "x_block.mlp.fc1",
                     "ff.net.2": "x_block.mlp.fc2"}.items():
            out[f"{src}.{d}.weight"] = f"{dst}.{s}.weight"
    for d, s in {"context_embedder": "context_embedder", "time_text_embed.timestep_embedder.linear_1":
                 "t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
                 "pos_embed.proj": "x_embedder.proj", "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
                 "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2", "norm_out.linear":
                 "final_layer.adaLN_modulation.1", "proj_out": "final_layer.linear"}.items():
        out[f"{d}.weight"] = f"{s}.weight"
    return out


def _flux_map(config: Mapping[str, Any]) -> dict[str, Any]:
    """{diffusers FLUX transformer weight key: BFL weight key (or (fused key, (dim, offset, size)))}, as ComfyUI's
    ``flux_to_diffusers`` lists them."""
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    out: dict[str, Any] = {}
    for i in range(config["num_layers"]):
        src, dst = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for j, q in enumerate("qkv"):
            out.update(_qkv(f"{src}.attn.to_{q}.weight", f"{dst}.img_attn.qkv.weight", j, hidden))
            out.update(_qkv(f"{src}.attn.add_{q}_proj.weight", f"{dst}.txt_attn.qkv.weight", j, hidden))
        for d, s in {"attn.to_out.0": "img_attn.proj", "norm1.linear": "img_mod.lin", "norm1_context.linear":
                     "txt_mod.lin", "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0",
                     "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0",
                     "ff_context.net.2": "txt_mlp.2"}.items():
            out[f"{src}.{d}.weight"] = f"{dst}.{s}.weight"
    for i in range(config["num_single_layers"]):
        src, dst = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for j, q in enumerate("qkv"):
            out.update(_qkv(f"{src}.attn.to_{q}.weight", f"{dst}.linear1.weight", j, hidden))
        out[f"{src}.proj_mlp.weight"] = (f"{dst}.linear1.weight", (0, 3 * hidden, 4 * hidden))
        out[f"{src}.norm.linear.weight"] = f"{dst}.modulation.lin.weight"
        out[f"{src}.proj_out.weight"] = f"{dst}.linear2.weight"
    for d, s in {"proj_out": "final_layer.linear", "x_embedder": "img_in", "context_embedder": "txt_in",
                 "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
                 "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
                 "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
                 "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
                 "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
                 "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
                 "norm_out.linear": "final_layer.adaLN_modulation.1"}.items():
        out[f"{d}.weight"] = f"{s}.weight"
    return out


def diffusers_to_native(family: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """{diffusers denoiser weight key: the native (SGM / MMDiT / BFL) weight key ComfyUI patches}."""
    family = _check_family(family)
    if family in ("sd15", "sdxl"):
        return _unet_sgm_map(config)
    return _mmdit_map(config) if family == "sd3" else _flux_map(config)


def comfyui_lora_keys(family: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """The LoRA names ComfyUI's ``model_lora_keys_unet`` accepts for this architecture's denoiser, each mapped
    to the model weight it patches (``diffusion_model.<native key>``, or (key, (dim, offset, size)) for a slice
    of a fused qkv). Only the kohya-style spellings (not the diffusers-format ones) are listed:

    * UNet: ``lora_unet_<native path>`` and ``lora_unet_<diffusers path>`` (through ``unet_to_diffusers``)
    * SD3 / FLUX: ``lora_transformer_<diffusers path>`` (OneTrainer), and for FLUX ``lora_unet_<BFL path>``
    """
    family = _check_family(family)
    native = diffusers_to_native(family, config)

    def target(value: Any) -> Any:
        return (f"diffusion_model.{value[0]}", value[1]) if isinstance(value, tuple) else f"diffusion_model.{value}"

    keys: dict[str, Any] = {}
    if family in ("sd15", "sdxl"):
        for value in native.values():
            keys["lora_unet_" + value.removesuffix(".weight").replace(".", "_")] = target(value)
        for k, value in native.items():
            keys["lora_unet_" + k.removesuffix(".weight").replace(".", "_")] = target(value)
        return keys
    if family == "flux":
        for value in native.values():
            if not isinstance(value, tuple):
                keys["lora_unet_" + value.removesuffix(".weight").replace(".", "_")] = target(value)
    for k, value in native.items():
        keys["lora_transformer_" + k.removesuffix(".weight").replace(".", "_")] = target(value)
    return keys


# ----------------------------------------------------------------------------------------------- files
def find_lora_file(path: str | Path) -> Path:
    """The diffusers LoRA file of a run folder (its final/), a checkpoint or LoRA folder, or the file itself."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    for candidate in (path / WEIGHTS_NAME, path / "final" / WEIGHTS_NAME):
        if candidate.is_file():
            return candidate
    raise ExportError(f"{path}: not a diffalign LoRA: expected {WEIGHTS_NAME} in it or in its final/ (a fully "
                      f"fine-tuned run has unet/ or transformer/ instead and needs no LoRA export)")


def _family_from_config(folder: Path) -> str | None:
    """The family the run trained, from a config.yaml next to the weights or in the run folder."""
    import yaml

    for candidate in (folder / "config.yaml", folder.parent / "config.yaml"):
        if candidate.is_file():
            try:
                pretrained = (yaml.safe_load(candidate.read_text()) or {}).get("model", {}).get("pretrained")
            except (yaml.YAMLError, AttributeError):
                return None
            if not pretrained:
                return None
            try:
                from diffusers import DiffusionPipeline

                index = DiffusionPipeline.load_config(pretrained)
            except (OSError, ValueError):
                return None
            return PIPELINE_FAMILY.get(index.get("_class_name", ""))
    return None


def read_lora(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any], str]:
    """(state dict, peft LoRA config, denoiser prefix) of a diffalign LoRA file; ExportError naming the file
    when it is something else."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ExportError(f"{path}: not a safetensors file ({err})") from None
    if any(split_lora_key(k) is None for k in state) and any(k.endswith(".alpha") for k in state):
        raise ExportError(f"{path}: already a kohya-format LoRA, not a diffalign (diffusers-format) one")
    prefixes = {k.split(".", 1)[0] for k in state}
    if len(prefixes) != 1 or not prefixes <= {"unet", "transformer"}:
        raise ExportError(f"{path}: not a diffalign LoRA: its keys should all start with unet. or transformer., "
                          f"found {sorted(prefixes)[:4]}")
    prefix = prefixes.pop()
    config = _lora_config(path, metadata, prefix)
    return state, config, prefix


def _lora_config(path: Path, metadata: Mapping[str, str], prefix: str) -> dict[str, Any]:
    """The peft config diffusers stores as ``lora_adapter_metadata`` ({"unet.r": 8, "unet.lora_alpha": ...}), or
    lora.rank / lora.alpha of the run's config.yaml."""
    raw = metadata.get("lora_adapter_metadata")
    if raw:
        try:
            flat = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ExportError(f"{path}: unreadable lora_adapter_metadata ({err})") from None
        config = {k.removeprefix(prefix + "."): v for k, v in flat.items() if k.startswith(prefix + ".")}
        if "lora_alpha" in config:
            return config
    import yaml

    for candidate in (path.parent / "config.yaml", path.parent.parent / "config.yaml"):
        if candidate.is_file():
            lora = (yaml.safe_load(candidate.read_text()) or {}).get("lora") or {}
            if "rank" in lora:
                alpha = lora.get("alpha")
                return {"r": lora["rank"], "lora_alpha": alpha if alpha is not None else lora["rank"]}
    raise ExportError(f"{path}: no LoRA alpha: the file has no lora_adapter_metadata and no config.yaml with "
                      "lora.rank was found next to it or in its run folder")


def _guess_family(folder: Path, prefix: str, modules: Mapping[str, Any]) -> str:
    found = _family_from_config(folder)
    if found is not None and DENOISER_PREFIX[found] == prefix:
        return found
    if prefix == "transformer":
        return "flux" if any(m.startswith("single_transformer_blocks.") for m in modules) else "sd3"
    # SDXL has no attention in its first down block; SD 1.x/2.x has
    return "sd15" if any(m.startswith("down_blocks.0.attentions.") for m in modules) else "sdxl"


def _export_name(lora_file: Path) -> str:
    folder = lora_file.parent
    if folder.name == "final" or re.fullmatch(r"checkpoint-\d+", folder.name):
        return folder.parent.name if folder.name == "final" else f"{folder.parent.name}_{folder.name}"
    return folder.name or "lora"


def _write_atomic(tensors: dict[str, Tensor], metadata: dict[str, str], target: Path) -> None:
    from safetensors.torch import save_file

    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_lora(run_or_lora_folder: str | Path, out_folder: str | Path | None = None,
                merge_into: str | Path | None = None, family: str | None = None) -> dict[str, Path]:
    """Write ``<out>/<name>_kohya.safetensors`` (``out`` = ``out_folder`` or the LoRA's own folder) and, with
    ``merge_into`` (a base pipeline folder, or its ``unet/`` / ``transformer/``), ``<out>/<name>_merged/<unet or
    transformer>/`` holding that denoiser with the LoRA merged in. Returns {"kohya": path[, "merged": folder]}."""
    lora_file = find_lora_file(run_or_lora_folder)
    state, config, prefix = read_lora(lora_file)
    modules = lora_modules(state, "sd15" if prefix == "unet" else "sd3")
    if family is None:
        family = _guess_family(lora_file.parent, prefix, modules)
    elif DENOISER_PREFIX[_check_family(family)] != prefix:
        raise ExportError(f"{lora_file}: a {prefix} LoRA cannot be a {family} LoRA")
    alphas = module_alphas(modules, config)
    tensors = to_kohya(state, alphas, family)
    if family == "flux":
        unread = sorted(m for m in modules if not FLUX_DIFFUSERS_READS.match(m))
        if unread:
            log.warning("%s: ComfyUI reads every module of the kohya file, but diffusers' reader of such FLUX files "
                        "maps attention layers only; not %s", lora_file, ", ".join(unread[:4]))
    ranks = sorted({pair["down"].shape[0] for pair in modules.values()})
    alpha_values = sorted(set(alphas.values()))
    metadata = {"format": "pt", "ss_network_module": "networks.lora", "ss_network_dim": str(ranks[0]),
                "ss_network_alpha": _number(alpha_values[0]), "ss_base_model_version": BASE_MODEL_HINT[family],
                "ss_training_comment": "exported by diffalign from a diffusers-format LoRA",
                "diffalign_family": family, "diffalign_source": str(lora_file)}
    if len(ranks) > 1 or len(alpha_values) > 1:      # kohya's single dim/alpha fields cannot say it; the tensors do
        metadata["ss_network_args"] = json.dumps({"ranks": ranks, "alphas": alpha_values})
    out = Path(out_folder) if out_folder is not None else lora_file.parent
    name = _export_name(lora_file)
    target = out / f"{name}_kohya.safetensors"
    _write_atomic(tensors, metadata, target)
    result = {"kohya": target}
    if merge_into is not None:
        result["merged"] = merge_lora(lora_file, merge_into, out / f"{name}_merged", prefix)
    return result


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def merge_lora(lora_file: str | Path, base: str | Path, out_folder: str | Path, prefix: str | None = None) -> Path:
    """The base denoiser (``base``: a pipeline folder or its unet/ / transformer/) with the LoRA merged into its
    weights, saved with ``save_pretrained(safe_serialization=True)`` as ``out_folder/<unet|transformer>``; written
    under a temporary name and moved into place. Returns that folder."""
    import diffusers

    lora_file = Path(lora_file)
    if prefix is None:
        prefix = read_lora(lora_file)[2]
    base = Path(base)
    folder = base / prefix if (base / prefix / "config.json").is_file() else base
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ExportError(f"--merge-into {base}: no {prefix}/config.json nor config.json: not a diffusers "
                          f"pipeline or {prefix} folder")
    class_name = json.loads(config_file.read_text()).get("_class_name", "")
    cls = getattr(diffusers, class_name, None)
    if cls is None or not hasattr(cls, "load_lora_adapter"):
        raise ExportError(f"{config_file}: model class {class_name!r} cannot take a LoRA")
    state, config, _ = read_lora(lora_file)
    modules = lora_modules(state, "sd15" if prefix == "unet" else "sd3")
    denoiser = cls.from_pretrained(str(folder), torch_dtype=_stored_dtype(folder))
    _apply_lora(denoiser, modules, module_alphas(modules, config), lora_file, class_name, folder)
    denoiser.unload_lora()
    out_folder = Path(out_folder)
    target = out_folder / prefix
    out_folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{prefix}.", suffix=".tmp", dir=out_folder))
    try:
        denoiser.save_pretrained(str(tmp), safe_serialization=True)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _apply_lora(denoiser: torch.nn.Module, modules: Mapping[str, Mapping[str, Tensor]], alphas: Mapping[str, float],
                lora_file: Path, class_name: str, folder: Path) -> None:
    """Add the LoRA as a peft adapter built from the tensors themselves (every module, its own rank and alpha)
    and merge it into the weights. (Not through ``load_lora_adapter(file)``: diffusers decides the key spelling
    from the first key, and diffalign's files mix ``.lora.down`` (attention) and ``.lora_A`` (other layers).)"""
    from collections import Counter

    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import set_peft_model_state_dict

    existing = {name for name, _ in denoiser.named_modules()}
    missing = sorted(m for m in modules if m not in existing)
    if missing:
        raise ExportError(f"{lora_file}: {len(missing)} of its modules are not in the {class_name} at {folder}, "
                          f"e.g. {missing[:3]}")
    ranks = {m: pair["down"].shape[0] for m, pair in modules.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=sorted(modules),
                        rank_pattern={f"^{re.escape(m)}$": v for m, v in ranks.items() if v != r},
                        alpha_pattern={f"^{re.escape(m)}$": v for m, v in alphas.items() if v != alpha})
    denoiser.add_adapter(config, adapter_name="diffalign_merge")
    weights = {}
    for module, pair in modules.items():
        weights[f"{module}.lora_A.weight"] = pair["down"]
        weights[f"{module}.lora_B.weight"] = pair["up"]
    result = set_peft_model_state_dict(denoiser, weights, adapter_name="diffalign_merge")
    if getattr(result, "unexpected_keys", None):
        raise ExportError(f"{lora_file}: keys not matching the {class_name}: {result.unexpected_keys[:3]}")
    for layer in denoiser.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.merge(adapter_names=["diffalign_merge"])


def _stored_dtype(folder: Path) -> torch.dtype:
    """The floating dtype of the denoiser's stored weights (merged weights are saved in the same one)."""
    from safetensors import safe_open

    files = sorted(folder.glob("diffusion_pytorch_model*.safetensors"))
    if not files:
        return torch.float32
    with safe_open(str(files[0]), framework="pt") as f:
        for key in f.keys():
            t = f.get_slice(key).get_dtype()
            if t in ("F16", "BF16", "F32"):
                return {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}[t]
    return torch.float32


def _check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ExportError(f"family {family!r}: expected one of {', '.join(FAMILIES)}")
    return family
