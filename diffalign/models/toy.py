"""The shipped toy base models: tiny SD 1.5- and SD3-architecture pipelines TRAINED on the toy world of coloured shapes.

Unlike the random pipelines of :mod:`diffalign.models.tiny`, this one draws something: a red, green, blue or
yellow circle or square on a grey background, 32 x 32 px, following the prompt's colour most of the time but not
always (it was trained with a quarter of the captions naming a wrong colour), which leaves preference tuning
something to fix. ``scripts/train_toy_base.py`` is the recipe (about 14 CPU-minutes). The weights ship in fp16
under ``diffalign/assets/toy_sd15`` (5.7 MB, no tokenizer); :func:`write_toy_pipeline` writes a normal fp32
diffusers folder, with the real CLIP BPE tokenizer, that ``StableDiffusionPipeline.from_pretrained`` loads.

The flow-matching toy (``scripts/train_toy_flow.py``, under ``diffalign/assets/toy_sd3``) is an SD3-architecture
pipeline on the same world: an MMDiT transformer trained with the rectified-flow loss, the SD 1.5 toy's VAE
(shared, not shipped twice), two frozen random CLIP encoders and no T5 (``model.max_sequence_length: 1``);
:func:`write_toy_flow_pipeline` writes it for ``StableDiffusion3Pipeline.from_pretrained(path,
text_encoder_3=None, tokenizer_3=None)`` and for diffalign.
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

from diffalign.checkpoint import write_atomic
from diffalign.models.tiny import EOS_TOKEN, clip_tokenizer

TOY_RESOLUTION = 32


def toy_assets() -> Path:
    return Path(str(resources.files("diffalign") / "assets" / "toy_sd15"))


def write_toy_pipeline(path: str | Path, overwrite: bool = False) -> Path:
    """Write the toy pipeline to ``path`` (atomically; kept if it exists unless ``overwrite``); returns ``path``."""
    path = Path(path)
    if (path / "model_index.json").is_file() and not overwrite:
        return path
    return write_atomic(path, _fill)


def write_toy_flow_pipeline(path: str | Path, overwrite: bool = False) -> Path:
    """Write the flow-matching toy pipeline (SD3 architecture) to ``path``; returns ``path``."""
    path = Path(path)
    if (path / "model_index.json").is_file() and not overwrite:
        return path
    return write_atomic(path, _fill_flow)


def _fill_flow(folder: Path) -> None:
    import json

    from safetensors.torch import load_file, save_file

    shutil.copytree(toy_assets().with_name("toy_sd3"), folder, dirs_exist_ok=True)
    shutil.copytree(toy_assets() / "vae", folder / "vae", dirs_exist_ok=True)     # the shared toy VAE
    config = json.loads((folder / "vae" / "config.json").read_text())
    (folder / "vae" / "config.json").write_text(json.dumps({**config, "shift_factor": 0.0, "force_upcast": False},
                                                           indent=2))
    for weights in folder.rglob("*.safetensors"):
        save_file({k: v.float() for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    clip_tokenizer(pad_token=EOS_TOKEN).save_pretrained(folder / "tokenizer")
    clip_tokenizer(pad_token="!").save_pretrained(folder / "tokenizer_2")


def _fill(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    shutil.copytree(toy_assets(), folder, dirs_exist_ok=True)
    for weights in folder.rglob("*.safetensors"):        # fp16 on disk in the package, fp32 for use
        save_file({k: v.float() for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    clip_tokenizer(pad_token=EOS_TOKEN).save_pretrained(folder / "tokenizer")
