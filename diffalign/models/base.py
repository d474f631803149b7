"""The model contract: what every method may ask of a model family, and nothing more.

Every method in diffalign operates on ``(x0, cond, t, x_t, target, prediction)`` in latent space. A model
family (SD 1.x/2.x, SDXL, ...) is a small subclass of :class:`DiffusionModel` over the components of a diffusers
pipeline; it overrides only how prompts become conditioning and how its denoiser (a UNet today, a transformer
for the flow-matching families) is called. The contract:

    Cond              dataclass: hidden [B,L,D]; pooled [B,P] or None; time_ids [B,6] or None; repeat(n)
    encode_prompt     prompts -> Cond                                  (family hook; @outside_autocast)
    add_time_ids      Cond + original sizes + crops -> Cond            (family hook; identity for SD 1.x/2.x)
    encode_images     pixels in [-1,1] -> (mean, std) of the scaled latent distribution (VAE in its own dtype)
    sample_latents    (mean, std) -> x0 = mean + std * eps  (a preference batch becomes (x0, Cond) on the
                      data side: data/batches.py pair_latents)
    decode_latents    latents -> images in [0,1], differentiable
    schedule          the family's noise schedule (models/schedules.py): every x0 / noise / x_t relation, training
                      levels, sampler and inversion steps, in fp32; methods and the sampler use nothing else
    predict           (x_t, level t, Cond) -> denoiser output          (family hook: _call_denoiser)
    reference()       context: predict() uses the reference (adapters disabled, or the frozen copy), no grad,
                      restored in `finally`
    sampling_cond     prompts + image size -> Cond for generating whole (uncropped) images
    null_cond         n + image size -> the unconditional Cond classifier-free guidance pairs it with
    latent_shape      n + image size -> the shape of the initial noise to generate from
    sampling_steps / scheduler_kwargs   the pipeline's sampler grid for a latent shape (family hook: FLUX's
                      resolution-dependent shift); distilled_guidance: guidance is a network input (FLUX.1-dev)
    denoiser, ref_denoiser    the trained network and, for full fine-tuning, its frozen copy
    weights on disk   denoiser_folder ("unet"), lora_prefix ("unet"), denoiser_class(), load_denoiser(folder),
                      save_lora_file(directory, layers, metadata) through the pipeline's save_lora_weights
    lora_targets      the modules LoRA adapts when lora.target_modules is not set (the attention projections;
                      on joint-attention transformers those of the text stream too)
    compile_blocks    torch.compile each of the denoiser's repeated blocks (``repeated_blocks``: the class
                      names, as diffusers' ``_repeated_blocks``), in the reference copy too

Adding to this list is an API change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from diffalign.models.schedules import FlowSchedule, VPSchedule, schedule_for
from diffalign.options import parse_dtype

if TYPE_CHECKING:
    from diffalign.config import ModelConfig

log = logging.getLogger("diffalign")


def outside_autocast(fn: Callable) -> Callable:
    """Run an encoder (VAE, text encoders) in its own dtype even when the caller is inside autocast: the trainer
    autocasts the denoiser only, so uncached latents equal the cached ones and an fp32 VAE stays fp32."""

    @functools.wraps(fn)
    def wrapper(self: DiffusionModel, *args: Any, **kwargs: Any) -> Any:
        kinds = {"cpu", self.device.type}
        with contextlib.ExitStack() as stack:
            for kind in kinds:
                stack.enter_context(torch.autocast(device_type=kind, enabled=False))
            return fn(self, *args, **kwargs)

    return wrapper


@dataclass
class Cond:
    """Prompt conditioning for a batch of B samples."""

    hidden: Tensor                   # [B, L, D] text encoder hidden states
    pooled: Tensor | None = None     # [B, P] pooled text embedding (SDXL)
    time_ids: Tensor | None = None   # [B, 6] micro-conditioning (SDXL)

    def map(self, fn: Any) -> Cond:
        return Cond(**{k: None if v is None else fn(v) for k, v in self.tensors().items()})

    def tensors(self) -> dict[str, Tensor | None]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def repeat(self, n: int) -> Cond:
        """[c; c; ...; c]: n copies stacked on the batch axis (winner block, loser block, ...)."""
        return self.map(lambda v: torch.cat([v] * n))

    @staticmethod
    def cat(conds: Sequence[Cond]) -> Cond:
        """The conds stacked on the batch axis, in order."""
        names = [f.name for f in dataclasses.fields(Cond)]
        return Cond(**{k: None if getattr(conds[0], k) is None else torch.cat([getattr(c, k) for c in conds])
                       for k in names})

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Cond:
        return self.map(lambda v: v.to(device=device, dtype=dtype if v.is_floating_point() else None))

    def __len__(self) -> int:
        return self.hidden.shape[0]


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while hasattr(module, "module") or hasattr(module, "_orig_mod"):
        module = getattr(module, "module", None) or module._orig_mod
    return module


def to_float32(network: torch.nn.Module) -> torch.nn.Module:
    """The network in float32, for full fine-tuning. diffusers (0.42) warns on every dtype cast that modules
    "should be kept in float32", even when it keeps none; a cast to float32 keeps any such module in float32, so
    the warning is left out here."""
    from diffusers.utils import logging as diffusers_logging

    quiet = diffusers_logging.get_logger("diffusers.models.modeling_utils")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return network.to(torch.float32)
    finally:
        quiet.setLevel(level)


UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# SD3 / FLUX joint attention: the image stream's projections, then the text stream's (where the prompt comes in)
JOINT_LORA_TARGETS = (*UNET_LORA_TARGETS, "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


class DiffusionModel:
    """Shared plumbing over a diffusers pipeline's denoiser, VAE, text encoders and noise schedule."""

    pipeline_class_name: ClassVar[str]   # the diffusers pipeline this family wraps
    denoiser_class_name: ClassVar[str] = "UNet2DConditionModel"   # the network; saved in and loaded from
    denoiser_folder: ClassVar[str] = "unet"                         # this pipeline subfolder, and LoRA keys
    lora_prefix: ClassVar[str] = "unet"                             # start with this prefix
    lora_targets: ClassVar[tuple[str, ...]] = UNET_LORA_TARGETS
    distilled_guidance: ClassVar[bool] = False   # guidance is a network input (FLUX.1-dev), not classifier-free
    repeated_blocks: ClassVar[tuple[str, ...]] = ("BasicTransformerBlock",)   # compiled once per shape

    def __init__(self, denoiser: torch.nn.Module | None, vae: torch.nn.Module, text_encoders: list, tokenizers: list,
                 schedule: VPSchedule | FlowSchedule, source: str = "") -> None:
        self.denoiser = denoiser
        self.vae = vae
        self.text_encoders = text_encoders
        self.tokenizers = tokenizers
        self.schedule = schedule
        self.source = source
        self.ref_denoiser: torch.nn.Module | None = None   # frozen copy for full fine-tuning; None with LoRA
        self._active: torch.nn.Module | None = None      # set inside reference()

    # ------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, cfg: ModelConfig, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32, denoiser: bool = True) -> DiffusionModel:
        """Load the pipeline's parts with explicit dtypes: denoiser and text encoders in ``dtype``, the VAE in
        ``model.vae_dtype``. ``denoiser=False`` loads only the encoders (what ``diffalign cache`` needs)."""
        from diffusers import AutoencoderKL, DDPMScheduler

        src = cfg.pretrained
        kw = {"revision": cfg.revision}
        network = None
        if denoiser:
            network = cls.denoiser_class().from_pretrained(src, subfolder=cls.denoiser_folder, variant=cfg.variant,
                                                           torch_dtype=dtype, **kw)
        vae = cls._load_vae(cfg, AutoencoderKL, kw)
        try:
            schedule = schedule_for(dict(DDPMScheduler.load_config(src, subfolder="scheduler", **kw)))
        except ValueError as err:
            raise ValueError(f"{src}: {err}") from None
        tokenizers, encoders = cls._load_text(src, cfg.variant, dtype, kw)
        model = cls(network, vae, encoders, tokenizers, schedule, source=src)
        if cfg.max_sequence_length is not None and hasattr(cls, "max_sequence_length"):
            model.max_sequence_length = cfg.max_sequence_length
        model.to(device)
        for module in model.modules():
            module.requires_grad_(False).eval()
        return model

    @staticmethod
    def _load_vae(cfg: ModelConfig, vae_class: type, kw: dict) -> torch.nn.Module:
        """The VAE in model.vae_dtype; a VAE whose config says ``force_upcast`` (it overflows in float16, as the
        stock SDXL VAE does) is kept in float32 when float16 was asked for, with a warning."""
        if cfg.vae:
            config = vae_class.load_config(cfg.vae)
            load = lambda dtype: vae_class.from_pretrained(cfg.vae, torch_dtype=dtype)
        else:
            config = vae_class.load_config(cfg.pretrained, subfolder="vae", **kw)
            load = lambda dtype: vae_class.from_pretrained(cfg.pretrained, subfolder="vae", variant=cfg.variant,
                                                           torch_dtype=dtype, **kw)
        dtype = parse_dtype(cfg.vae_dtype)
        if dtype == torch.float16 and config.get("force_upcast", False):
            log.warning("model.vae_dtype=float16, but the VAE of %s says force_upcast (it overflows in float16); "
                        "keeping it in float32. Use an fp16-fix VAE (model.vae=madebyollin/sdxl-vae-fp16-fix) to run "
                        "it in float16.", cfg.vae or cfg.pretrained)
            dtype = torch.float32
        return load(dtype)

    @classmethod
    def _load_text(cls, src: str, variant: str | None, dtype: torch.dtype, kw: dict) -> tuple[list, list]:
        raise NotImplementedError

    def modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.denoiser, self.vae, *self.text_encoders) if m is not None]

    def to(self, device: torch.device | str) -> DiffusionModel:
        for module in self.modules():
            module.to(device)
        if self.ref_denoiser is not None:
            self.ref_denoiser.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(unwrap(self.denoiser if self.denoiser is not None else self.vae).parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The denoiser's own weights' dtype (LoRA adapters, kept in fp32, do not count)."""
        return next(p.dtype for n, p in unwrap(self.denoiser).named_parameters() if "lora_" not in n)

    # ------------------------------------------------------------------------------- family hooks
    def encode_prompt(self, prompts: Sequence[str]) -> Cond:
        raise NotImplementedError

    def add_time_ids(self, cond: Cond, original_sizes: Tensor, crops: Tensor,
                     target_size: tuple[int, int] | None = None) -> Cond:
        return cond

    # ------------------------------------------------------------------------------- VAE
    @property
    def _vae_scale(self) -> tuple[float, float]:
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return self.vae.config.scaling_factor, shift

    @torch.no_grad()
    @outside_autocast
    def encode_images(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """pixels [B,3,H,W] in [-1,1] -> (mean, std) [B,C,h,w] of the scaled latent distribution, fp32."""
        scale, shift = self._vae_scale
        dist = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist
        mean, std = (dist.mean.float() - shift) * scale, dist.std.float() * scale
        return mean.to(self.device), std.to(self.device)

    @staticmethod
    def sample_latents(mean: Tensor, std: Tensor, generator: torch.Generator | None = None) -> Tensor:
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
        return mean.float() + std.float() * eps

    @outside_autocast
    def decode_latents(self, latents: Tensor) -> Tensor:
        """latents [B,C,h,w] -> images [B,3,H,W] in [0,1]; differentiable (no no_grad here)."""
        scale, shift = self._vae_scale
        images = self.vae.decode((latents / scale + shift).to(self.vae.device, self.vae.dtype)).sample
        return (images.float() / 2 + 0.5).clamp(0, 1).to(latents.device)

    def offload_encoders(self) -> None:
        """Keep the VAE and text encoders on the CPU (training from a cache never calls them; in-training
        evaluation still works, more slowly): their accelerator memory goes to the denoiser."""
        for module in (self.vae, *self.text_encoders):
            module.to("cpu")

    def compile_blocks(self, **options: Any) -> int:
        """Regional compilation: ``torch.compile(**options)`` of every ``repeated_blocks`` module of the denoiser
        and of its frozen copy, in place (parameter names and the saved files do not change). torch >= 2.5 inlines
        the modules, so blocks of one class and shape share their compiled code: a UNet compiles a few graphs, not
        one per block. Returns how many blocks; none found is an error (a network with other block classes)."""
        count = 0
        for network in (self.denoiser, self.ref_denoiser):
            for module in (network.modules() if network is not None else ()):
                if type(module).__name__ in self.repeated_blocks:
                    module.compile(**options)
                    count += 1
        if not count:
            raise ValueError(f"{type(unwrap(self.denoiser)).__name__} has no {' or '.join(self.repeated_blocks)} "
                             "blocks to compile")
        return count

    # ------------------------------------------------------------------------------- denoiser
    def predict(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """Denoiser output for x_t at schedule levels t [B]; the reference model inside reference()."""
        network = self._active if self._active is not None else self.denoiser
        cond = cond.to(x_t.device, self.dtype)
        return self._call_denoiser(network, x_t.to(self.dtype), self.schedule.timestep(t).to(x_t.device), cond)

    def _call_denoiser(self, network: torch.nn.Module, x: Tensor, timestep: Tensor, cond: Cond) -> Tensor:
        """One call of the network (family hook; the SD 1.x/2.x UNet's signature here)."""
        return network(x, timestep, encoder_hidden_states=cond.hidden, return_dict=False)[0]

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Inside this block predict() runs the reference model without gradient. Always restored."""
        base = unwrap(self.denoiser)
        with torch.no_grad():
            if self.ref_denoiser is not None:
                self._active = self.ref_denoiser
                try:
                    yield
                finally:
                    self._active = None
                return
            base.disable_adapters()
            self._active = base
            try:
                yield
            finally:
                self._active = None
                base.enable_adapters()

    # ------------------------------------------------------------------------------- generation
    def sampling_cond(self, prompts: Sequence[str], size: tuple[int, int]) -> Cond:
        """Conditioning to generate whole images of `size` (H, W) pixels: original = target size, no crop."""
        n = len(prompts)
        sizes = torch.tensor([list(size)] * n)
        return self.add_time_ids(self.encode_prompt(prompts), sizes, torch.zeros(n, 2, dtype=torch.long), size)

    def null_cond(self, n: int, size: tuple[int, int]) -> Cond:
        """The unconditional branch of classifier-free guidance: the empty prompt (family hook)."""
        return self.sampling_cond([""] * n, size)

    def latent_shape(self, n: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
        f = self.latent_factor
        return n, self.vae.config.latent_channels, size[0] // f, size[1] // f

    def sampling_steps(self, num_steps: int, latent_shape: Sequence[int]) -> list[tuple]:
        """The sampler's (t, t_next) pairs for latents of this shape, as the family's pipeline chooses them."""
        return self.schedule.sampling_steps(num_steps)

    def scheduler_kwargs(self, num_steps: int, latent_shape: Sequence[int]) -> dict[str, Any]:
        """What the pipeline passes to its diffusers scheduler's set_timesteps besides the step count."""
        return {}

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    # ------------------------------------------------------------------------------- weights on disk
    @classmethod
    def pipeline_class(cls) -> type:
        import diffusers

        return getattr(diffusers, cls.pipeline_class_name)

    @classmethod
    def denoiser_class(cls) -> type:
        import diffusers

        return getattr(diffusers, cls.denoiser_class_name)

    def load_denoiser(self, folder: str | Path, dtype: torch.dtype | None = None) -> torch.nn.Module:
        """A fully fine-tuned denoiser saved by ``save_pretrained`` (fp32, or fp16-only files), in ``dtype``."""
        folder = Path(folder)
        fp16_only = not any(folder.glob("diffusion_pytorch_model.safetensors*")) and \
            (folder / "diffusion_pytorch_model.fp16.safetensors").is_file()
        return self.denoiser_class().from_pretrained(folder, torch_dtype=dtype or self.dtype,
                                                     variant="fp16" if fp16_only else None)

    def save_lora_file(self, directory: str | Path, layers: dict[str, Tensor], metadata: dict) -> None:
        """Write ``pytorch_lora_weights.safetensors`` through the pipeline's own ``save_lora_weights``, so the keys
        carry the family's prefix and diffusers, ComfyUI and A1111 loaders read it as that pipeline's LoRA."""
        prefix = self.lora_prefix
        self.pipeline_class().save_lora_weights(str(directory), safe_serialization=True,
                                                **{f"{prefix}_lora_layers": layers,
                                                   f"{prefix}_lora_adapter_metadata": metadata})
