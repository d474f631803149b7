"""Typed configuration: a dataclass tree, strict YAML loading and ``a.b=c`` overrides.

A YAML file holds only the deviations from the defaults below. Every key is checked: an unknown key is an
error that names the file, the key and the closest valid name. Each field is documented once, here, through
``opt(default, help)``; ``diffalign train --help`` prints these texts.

The ``method`` section is polymorphic: ``method.name`` picks the dataclass (see ``diffalign.methods``).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from diffalign.methods import method_config_class
from diffalign.options import ConfigError, opt

__all__ = ["Config", "ConfigError", "DataConfig", "EvalConfig", "LoraConfig", "ModelConfig", "TrainConfig",
           "apply_override", "build_config", "describe_options", "dump_config", "load_config", "opt", "to_dict"]


@dataclass
class ModelConfig:
    pretrained: str = opt("", "hub id or local diffusers pipeline folder; the family (SD 1.x/2.x, SDXL) is "
                              "read from its model_index.json")
    vae: str | None = opt(None, "separate VAE (hub id or folder), e.g. madebyollin/sdxl-vae-fp16-fix")
    variant: str | None = opt(None, "weights variant to load, e.g. fp16")
    revision: str | None = opt(None, "hub revision")
    max_sequence_length: int | None = opt(None, "T5 tokens of SD3 / FLUX prompts (null = the pipeline's default: "
                                                "256 for SD3, 512 for FLUX; fewer is faster)", ge=1)
    guidance: float = opt(3.5, "FLUX.1-dev's embedded guidance value during training (a network input, not "
                               "classifier-free guidance; FluxPipeline's default); other families ignore it", ge=0)
    vae_dtype: str = opt("float32", "VAE precision; SDXL's VAE overflows in float16 unless it is an fp16-fix VAE",
                         ("float32", "float16", "bfloat16"))


@dataclass
class DataConfig:
    path: str = opt("", "preference pairs: a datasets hub name, or a parquet file, folder or glob (or an fsspec "
                        "URL to one: s3://..., hf://datasets/...), with Pick-a-Pic's columns (caption, jpg_0, jpg_1, "
                        "label_0) or prompt, chosen, rejected (chosen preferred); webdataset tar shards (a .tar "
                        "file, folder, glob or {000..099} pattern); or a .jsonl file of {prompt, chosen, rejected} "
                        "image paths")
    prompts: str | list | None = opt(None, "prompts for prompt-only methods (AlignProp) and evaluation: a text "
                                           "file with one prompt per line, or a list")
    format: str = opt("auto", "input format; auto picks jsonl for .jsonl files, folder for a folder of pair "
                              "folders (prompt.txt, chosen.<ext>, rejected.<ext> in each), webdataset for .tar "
                              "shards (KEY.jpg_0, KEY.jpg_1, KEY.json per sample), pickapic otherwise (parquet or a "
                              "hub dataset, in either column layout)",
                      ("auto", "pickapic", "jsonl", "folder", "webdataset"))
    split: str = opt("train", "split to read from a datasets name or folder")
    shuffle_window: int = opt(16, "epoch order of parquet and tar sources: their blocks (parquet row groups, tar "
                                  "chunks of 100 samples) are permuted, then pairs are shuffled within each run of "
                                  "this many consecutive blocks, so a reading process holds at most this many row "
                                  "groups in memory; 0 = one random permutation of all pairs (each pair then costs "
                                  "a row-group read). jsonl, folder, hub and cached data always use that full "
                                  "permutation", ge=0)
    resolution: int = opt(1024, "square training resolution in pixels (a multiple of the VAE's latent factor, "
                                "8 for SD)", ge=8)
    crop: str = opt("center", "crop after resizing the short side to `resolution` (PIL bicubic, antialiased; "
                              "DiffusionDPO, the diffusers DPO examples and MaPO resize bilinearly)",
                    ("center", "random"))
    hflip: float = opt(0.0, "probability of a horizontal flip (DiffusionDPO, the diffusers DPO examples and MaPO "
                            "flip with 0.5 by default, off with --no_hflip)", ge=0, le=1)
    paired_transforms: bool = opt(True, "winner and loser share one crop and flip decision (as the diffusers "
                                        "SDXL DPO script and MaPO; DiffusionDPO and the diffusers SD 1.5 script "
                                        "flip each image independently)")
    min_score_margin: float | None = opt(None, "jsonl pairs with `chosen_score` and `rejected_score` (e.g. reward "
                                               "or human ratings): keep those whose scores differ by more than "
                                               "this, the higher-scored image as winner; null = use chosen/rejected "
                                               "as given", ge=0)
    ties: str = opt("drop", "pairs labelled 0.5: drop them (counted at start), or error",
                    ("drop", "error"))
    on_bad_image: str = opt("error", "a corrupt or missing image: raise naming the row and file, or drop the "
                                     "WHOLE pair and count it", ("error", "skip_pair"))
    caption_dropout: float = opt(0.0, "probability of replacing a prompt by the empty prompt (the official "
                                      "Diffusion-DPO script uses 0.2; we default to 0)", ge=0, le=1)
    max_skip_fraction: float = opt(0.05, "with on_bad_image=skip_pair, stop with an error once more than this share "
                                         "of the pairs read in an epoch were unreadable", ge=0, le=1)
    null_prompt: str = opt("error", "a null prompt (parquet caption or jsonl prompt): an error naming the row, or "
                                    "the empty prompt", ("error", "empty"))
    outside_paths: bool = opt(False, "allow jsonl image paths that leave the jsonl file's folder (absolute paths or "
                                     "`..`); refused by default")
    max_pairs: int | None = opt(None, "use only the first N pairs (after dropping ties)", ge=1)
    cache_dir: str | None = opt(None, "latent/text cache written by `diffalign cache`; used when set")
    cache_dtype: str = opt("float16", "dtype of cached tensors", ("float16", "float32", "bfloat16"))
    offload_encoders: bool = opt(False, "with a cache, keep the VAE and text encoders on the CPU while training "
                                        "(only in-training evaluation uses them), freeing accelerator memory")
    cache_batch_size: int = opt(8, "pairs read and VAE-encoded at a time by `diffalign cache` (host memory holds a "
                                   "few such batches of pixels and one shard of latents)", ge=1)
    cache_shard_pairs: int = opt(1024, "pairs per cache shard file; under a multi-process launch each process "
                                       "writes every world-th shard", ge=1)
    reference_epochs: int = opt(0, "`diffalign cache` also computes the reference model's errors of every pair for "
                                   "this many epochs (for method.reference=precomputed; 0 = none)", ge=0)
    num_workers: int = opt(2, "dataloader worker processes for decoding images (at most the CPU cores: more are "
                                 "clamped, with one warning)", ge=0)


@dataclass
class LoraConfig:
    enabled: bool = opt(True, "train LoRA adapters (reference = adapters disabled); false = full fine-tuning "
                              "with a frozen reference copy")
    rank: int = opt(8, "LoRA rank r", ge=1)
    alpha: float | None = opt(None, "LoRA alpha; defaults to the rank (scale 1)", gt=0)
    target_modules: list | None = opt(None, "denoiser modules that get adapters; null = the family's attention "
                                            "projections: to_q, to_k, to_v, to_out.0 (SD 1.x/2.x, SDXL), and on "
                                            "SD3 / FLUX the joint attention's text stream too (add_q_proj, "
                                            "add_k_proj, add_v_proj, to_add_out)")
    init: str = opt("gaussian", "LoRA weight init passed to peft", ("gaussian", "default"))
    init_from: str | None = opt(None, "start the adapters from this LoRA (a folder with pytorch_lora_weights."
                                      "safetensors, e.g. an earlier run's final/) instead of `init`; the reference "
                                      "stays the base model (adapters disabled)")


COMPILE_KEYS = ("backend", "mode", "fullgraph", "dynamic", "options")   # torch.compile's, less the model


@dataclass
class TrainConfig:
    batch_size: int = opt(1, "pairs (or prompts) per process per micro-step", ge=1)
    grad_accum: int = opt(1, "micro-steps per optimizer step", ge=1)
    max_steps: int = opt(2000, "optimizer steps", ge=1)
    lr: float = opt(1e-5, "peak learning rate (not scaled by batch size)", gt=0)
    lr_scheduler: str = opt("constant_with_warmup", "diffusers scheduler name",
                            ("constant", "constant_with_warmup", "linear", "cosine"))
    warmup_steps: int = opt(0, "linear warmup steps", ge=0)
    optimizer: str = opt("adamw", "optimizer", ("adamw", "adafactor"))
    weight_decay: float = opt(1e-2, "decoupled weight decay", ge=0)
    adam_betas: list = opt([0.9, 0.999], "AdamW betas")
    adam_eps: float = opt(1e-8, "AdamW epsilon", gt=0)
    fused_adamw: bool | None = opt(None, "AdamW's fused implementation: one kernel per step, and a non-finite "
                                         "step is skipped on the device, so the NaN guard's host sync moves off "
                                         "the critical path (read after the next step's backward); null = on CUDA")
    max_grad_norm: float | None = opt(1.0, "gradient clipping norm; null disables clipping", gt=0)
    mixed_precision: str = opt("no", "autocast precision; frozen weights are stored in it", ("no", "fp16", "bf16"))
    gradient_checkpointing: bool = opt(False, "recompute denoiser activations in backward")
    channels_last: bool = opt(False, "store the denoiser's convolution weights channels-last (NHWC), the layout "
                                     "cuDNN's bf16 convolutions prefer (the activations follow); one process or "
                                     "DDP only")
    compile: bool = opt(False, "torch.compile each of the denoiser's repeated blocks (regional compilation: the "
                               "transformer blocks; one compile per distinct block shape, so the first steps take "
                               "longer); one process, DDP, FSDP2 or ZeRO-1/2, refused with ZeRO-3")
    compile_options: dict = opt({}, "keyword arguments for torch.compile: backend, mode, fullgraph, dynamic, "
                                    "options (e.g. {mode: max-autotune-no-cudagraphs})")
    timestep_sampling: str = opt("uniform", "training timesteps: uniform, or for flow-matching models the "
                                            "logit-normal(0, 1) or 'mode' draws SD3 was trained with",
                                 ("uniform", "logit_normal", "mode"))
    seed: int = opt(0, "global seed: data order, noise, timesteps", ge=0)
    checkpoint_every: int = opt(500, "write a checkpoint every N steps (0 = only the final weights)", ge=0)
    keep_last: int = opt(3, "checkpoints kept on disk (older ones are deleted)", ge=1)
    resume: str | None = opt(None, "`latest` or a checkpoint folder to continue from; settings that differ from "
                                   "the checkpoint's are listed (model, method, LoRA shape, batch layout refused)")
    overwrite: bool = opt(False, "start afresh in an output_dir that holds another run: delete its checkpoints, "
                                 "final/, metrics and eval samples first (otherwise such a folder is refused)")
    log_every: int = opt(10, "log metrics every N steps", ge=1)
    report_to: str = opt("tensorboard", "accelerate tracker", ("tensorboard", "wandb", "none"))
    process_timeout_s: int = opt(1800, "seconds a process waits for the others at a collective (a checkpoint, the "
                                       "main process's in-training evaluation) before the run fails instead of "
                                       "hanging; raise it when evaluation or checkpoints take longer", ge=1)

    def __post_init__(self) -> None:
        betas = self.adam_betas
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                      for b in betas):
            raise ConfigError(f"`train.adam_betas` = {betas!r} must be two numbers in [0, 1)")
        unknown = sorted(set(self.compile_options) - set(COMPILE_KEYS))
        if unknown:
            raise ConfigError(f"`train.compile_options` has unknown key(s) {', '.join(unknown)}; torch.compile "
                              f"takes {', '.join(COMPILE_KEYS)}")
        if self.compile_options and not self.compile:
            raise ConfigError("`train.compile_options` is set but `train.compile` is false")


SCHEDULERS = ("ddim", "pipeline", "ddpm", "euler", "euler_ancestral", "dpmpp_2m", "unipc", "pndm")
DEFAULT_EVAL_REWARDS = ["pickscore", "hpsv2", "aesthetic", "clip_score"]


@dataclass
class EvalConfig:
    prompts: str | list | None = opt(None, "evaluation prompts: a text file (one per line) or a list; null = the "
                                           "50 shipped prompts in diffalign/assets/eval_prompts.txt")
    seeds: list = opt([0, 1], "every prompt is sampled once per seed; base and checkpoints start from the same "
                              "initial noise, torch.Generator('cpu').manual_seed(seed), as a diffusers pipeline would")
    checkpoints: list = opt([], "weights to compare with the base: run folders (their final/), checkpoint-N or "
                                "final folders, LoRA folders (pytorch_lora_weights.safetensors), folders holding "
                                "unet/, or diffusers UNet folders; an entry may be {name: label, path: folder}. "
                                "Empty = this run's output_dir/final when it exists")
    base: bool = opt(True, "also sample the base model (win rates need it)")
    num_steps: int = opt(50, "sampler steps")
    guidance_scale: float = opt(7.5, "classifier-free guidance scale (diffusers' default: 7.5 for SD 1.x/2.x, "
                                     "5.0 for SDXL); at or below 1 guidance is off, as in the pipelines")
    scheduler: str = opt("ddim", "sampler: a diffusers scheduler configured from the pipeline's scheduler config; "
                                 "`pipeline` = the pipeline's own scheduler class", SCHEDULERS)
    eta: float = opt(0.0, "DDIM eta (ddim only); noise comes from the same per-image seeded generator")
    resolution: int | None = opt(None, "square image size in pixels; null = data.resolution")
    negative_prompt: str = opt("", "negative prompt for classifier-free guidance; empty = the pipeline's "
                                   "unconditional branch (zeros for SDXL)")
    batch_size: int = opt(4, "images per sampling batch")
    dtype: str = opt("auto", "UNet and text-encoder precision when sampling: auto = float16 on CUDA, float32 on "
                             "CPU", ("auto", "float32", "float16", "bfloat16"))
    rewards: list = opt(list(DEFAULT_EVAL_REWARDS), "rewards to score with (names from diffalign.rewards, or "
                                                    "{name: ..., option: ...} mappings); the first one is "
                                                    "printed on the grids")
    num_resamples: int = opt(10000, "bootstrap resamples for the 95% intervals (prompts are resampled)")
    confidence: float = opt(0.95, "interval coverage")
    grid_cell: int = opt(256, "pixel size of one image in the grids")
    grid_rows: int = opt(10, "rows (prompt x seed) per grid image")
    every: int = opt(0, "in-training evaluation every N optimizer steps (0 = off): samples the first "
                        "`every_prompts` prompts at seeds[0] and logs a grid to the trackers and output_dir/eval/")
    every_prompts: int = opt(4, "prompts sampled by the in-training evaluation")

    def __post_init__(self) -> None:
        if not self.seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in self.seeds):
            raise ConfigError(f"`eval.seeds` must be a non-empty list of non-negative integers, got {self.seeds!r}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"`eval.seeds` has repeated seeds: {self.seeds!r}")
        for key in ("num_steps", "batch_size", "num_resamples", "grid_rows", "every_prompts"):
            if getattr(self, key) < 1:
                raise ConfigError(f"`eval.{key}` must be at least 1, got {getattr(self, key)}")
        checks = {"every": self.every >= 0, "guidance_scale": self.guidance_scale >= 0,
                  "confidence": 0 < self.confidence < 1, "grid_cell": self.grid_cell >= 16,
                  "resolution": self.resolution is None or self.resolution >= 8, "eta": self.eta >= 0}
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(f"`eval.{key}` = {getattr(self, key)!r} is out of range")
        if self.eta > 0 and self.scheduler != "ddim":
            raise ConfigError(f"`eval.eta` = {self.eta} applies to the ddim scheduler only, not {self.scheduler!r}")


@dataclass
class Config:
    name: str = opt("run", "run name; outputs go to output_dir")
    output_dir: str = opt("", "run folder; defaults to runs/<name>")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    method: Any = None  # a method config dataclass chosen by method.name; see diffalign.methods

    def __post_init__(self) -> None:
        if not self.output_dir:
            self.output_dir = str(Path("runs") / self.name)


# ----------------------------------------------------------------------------------------------- loading


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML file (or only defaults when ``path`` is None), apply ``a.b=c`` overrides, validate."""
    raw: dict = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError as err:
            raise ConfigError(f"config file not found: {path}") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
        if not raw:
            raise ConfigError(f"{path}: the config file is empty; it needs at least model.pretrained and data.path "
                              "(see configs/ for complete examples)")
    for item in overrides:
        apply_override(raw, item)
    return build_config(raw, source)


def apply_override(raw: dict, item: str) -> None:
    """Set ``a.b.c=value`` in a nested dict; the value is parsed as YAML (so 1e-5, true, [a, b] work)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(value) if value != "" else ""


def build_config(raw: dict, source: str = "<dict>") -> Config:
    raw = dict(raw)
    method_raw = dict(raw.pop("method", None) or {})
    cfg = _build(Config, raw, source, "")
    name = method_raw.get("name", "dpo")
    cls = method_config_class(name, source)
    cfg.method = _build(cls, method_raw, source, "method.")
    return cfg


def _build(cls: type, raw: dict, source: str, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: `{prefix.rstrip('.') or 'top level'}` must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"{source}: unknown key `{prefix}{key}`{_suggest(key, fields)}")
        kwargs[key] = _coerce(hints[key], value, fields[key], source, prefix + key)
    try:
        return cls(**kwargs)
    except ConfigError as err:           # a dataclass's own cross-field check (__post_init__)
        raise ConfigError(f"{source}: {err}") from None


def _suggest(key: str, valid: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"; did you mean `{close[0]}`?" if close else f"; valid keys: {', '.join(sorted(valid))}"


def _coerce(hint: Any, value: Any, fld: dataclasses.Field, source: str, key: str) -> Any:
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        return _build(hint, value or {}, source, key + ".")
    allowed = _union_args(hint)
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"{source}: `{key}` cannot be null")
    choices = fld.metadata.get("choices")
    if isinstance(value, bool) and choices and ("yes" if value else "no") in choices:
        value = "yes" if value else "no"     # YAML 1.1 reads a bare `no` (mixed_precision: no) as false
    value = _to_type(value, [a for a in allowed if a is not type(None)], source, key)
    if choices and value not in choices:
        raise ConfigError(f"{source}: `{key}` = {value!r} is not one of {', '.join(choices)}"
                          f"{_suggest(str(value), choices) if isinstance(value, str) else ''}")
    _check_range(value, fld.metadata, source, key)
    return value


def _check_range(value: Any, meta: Any, source: str, key: str) -> None:
    """The ``ge`` / ``gt`` / ``le`` bounds of ``opt``; a violation names the key and the allowed range."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    ge, gt, le = meta.get("ge"), meta.get("gt"), meta.get("le")
    bad = (ge is not None and not value >= ge) or (gt is not None and not value > gt) or \
        (le is not None and not value <= le) or value != value
    if bad:
        bounds = [f">= {ge:g}" if ge is not None else "", f"> {gt:g}" if gt is not None else "",
                  f"<= {le:g}" if le is not None else ""]
        allowed = " and ".join(b for b in bounds if b)
        raise ConfigError(f"{source}: `{key}` = {value!r} is out of range (must be {allowed})")


def field_problems(section: Any, prefix: str) -> list[str]:
    """The choice and range violations of a config dataclass built in code (not through ``load_config``, which
    checks each key as it reads it): one message per field at fault, naming ``prefix + name``."""
    problems = []
    for f in dataclasses.fields(section):
        value, choices = getattr(section, f.name), f.metadata.get("choices")
        if choices and value not in choices:
            problems.append(f"`{prefix}{f.name}` = {value!r} is not one of {', '.join(choices)}")
            continue
        try:
            _check_range(value, f.metadata, "", prefix + f.name)
        except ConfigError as err:
            problems.append(str(err).removeprefix(": "))
    return problems


def _union_args(hint: Any) -> tuple:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:  # PyYAML reads 1e-5 (no dot) as a string
        return float(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _to_type(value: Any, types_: list, source: str, key: str) -> Any:
    for t in types_:
        base = typing.get_origin(t) or t
        if base is float and _as_float(value) is not None:
            return _as_float(value)
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base in (bool, list, dict, str) and isinstance(value, base):
            return value
    names = " or ".join(getattr(t, "__name__", str(t)) for t in types_)
    raise ConfigError(f"{source}: `{key}` = {value!r} should be {names}")


def to_dict(cfg: Any) -> dict:
    """The config as plain data (for YAML dumps, manifests and tracker hyper-parameters)."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe_options(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every leaf option, for ``--help``."""
    rows = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            rows += describe_options(hint, prefix + f.name + ".")
        elif f.metadata.get("help"):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            help_ = f.metadata["help"]
            if f.metadata.get("choices"):
                help_ += f" [{' | '.join(f.metadata['choices'])}]"
            bounds = [f"{op} {f.metadata[k]:g}" for k, op in (("ge", ">="), ("gt", ">"), ("le", "<="))
                      if f.metadata.get(k) is not None]
            if bounds:
                help_ += f" [{', '.join(bounds)}]"
            rows.append((prefix + f.name, repr(default), help_))
    return rows
