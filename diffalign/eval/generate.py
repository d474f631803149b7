"""Fixed-seed image generation with any diffusers scheduler, over the model contract.

Image k starts from ``torch.randn(latent_shape(1), generator=torch.Generator("cpu").manual_seed(seeds[k]))``, which
is what a diffusers pipeline draws for one image with that generator, so base and tuned models share their
initial noise and a user can reproduce any image in diffusers. Stochastic samplers (DDIM with eta, ancestral
ones) keep drawing from the same per-image generator, so an image does not depend on what else is in its batch.
Classifier-free guidance is applied to the raw UNet output, as the pipelines do.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from diffalign.models.base import Cond, DiffusionModel
from diffalign.options import ConfigError
from diffalign.sampling import guidance_on

SCHEDULER_CLASSES = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "euler": "EulerDiscreteScheduler",
                     "euler_ancestral": "EulerAncestralDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler",
                     "unipc": "UniPCMultistepScheduler", "pndm": "PNDMScheduler"}


def make_scheduler(model: DiffusionModel, name: str, revision: str | None = None) -> Any:
    """A sampling scheduler from the pipeline's own scheduler config (``pipeline`` = the pipeline's class)."""
    import diffusers

    config = _pipeline_scheduler_config(model, revision)
    if model.schedule.kind == "flow" and name != "pipeline":
        raise ConfigError(f"eval.scheduler={name} is a sampler for variance-preserving models; {model.source} is a "
                          f"flow-matching {type(model).__name__}: set eval.scheduler=pipeline (its "
                          f"{config.get('_class_name', 'flow-matching scheduler')})")
    cls_name = config.get("_class_name", "") if name == "pipeline" else SCHEDULER_CLASSES[name]
    cls = getattr(diffusers, cls_name, None)
    if cls is None:
        raise ValueError(f"{model.source}: unknown scheduler class {cls_name!r}")
    return cls.from_config(config)


def _pipeline_scheduler_config(model: DiffusionModel, revision: str | None) -> dict:
    """The scheduler config saved with the pipeline (set_alpha_to_one, spacing, ...), not the training copy's."""
    try:
        from diffusers import DDIMScheduler

        return dict(DDIMScheduler.load_config(model.source, subfolder="scheduler", revision=revision))
    except (OSError, ValueError):
        return dict(model.schedule.config)


def initial_noise(model: DiffusionModel, seeds: Sequence[int], size: tuple[int, int]) -> tuple[Tensor, list]:
    """Initial latents [B,C,h,w] on the CPU and the per-image generators they were drawn from."""
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    shape = model.latent_shape(1, size)
    latents = torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])
    return latents, generators


def guidance_conds(model: DiffusionModel, prompts: Sequence[str], size: tuple[int, int],
                   negative_prompt: str = "") -> tuple[Cond, Cond]:
    """(cond, uncond) for the prompts; the unconditional branch is the negative prompt or the model's null."""
    cond = model.sampling_cond(list(prompts), size)
    n = len(prompts)
    uncond = model.sampling_cond([negative_prompt] * n, size) if negative_prompt else model.null_cond(n, size)
    return cond, uncond


@torch.no_grad()
def generate(model: DiffusionModel, scheduler: Any, prompts: Sequence[str], seeds: Sequence[int],
             size: tuple[int, int], num_steps: int, guidance_scale: float, negative_prompt: str = "",
             eta: float = 0.0) -> Tensor:
    """Images [B,3,H,W] in [0,1] (float32, on the CPU) for prompts[k] from the noise of seeds[k]."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    device = model.device
    latents, generators = initial_noise(model, seeds, size)
    scheduler.set_timesteps(num_steps, device=device, **model.scheduler_kwargs(num_steps, latents.shape))
    x = latents.to(device) * getattr(scheduler, "init_noise_sigma", 1.0)      # flow schedulers start at 1
    cond, uncond = guidance_conds(model, prompts, size, negative_prompt)
    guided = guidance_on(guidance_scale, model)   # as in the pipelines: at or below 1, the conditional branch only
    both = Cond.cat([uncond, cond]) if guided else cond
    step_kwargs = _step_kwargs(scheduler, generators, eta)
    with embedded_guidance(model, guidance_scale):
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
            x_in = torch.cat([x_in, x_in]) if guided else x_in
            pred = model.predict(x_in, model.schedule.level(t).expand(x_in.shape[0]).to(device), both).float()
            if guided:
                pred_u, pred_c = pred.chunk(2)
                pred = pred_u + guidance_scale * (pred_c - pred_u)
            x = scheduler.step(pred, t, x, **step_kwargs).prev_sample
    return model.decode_latents(x).float().cpu()


@contextlib.contextmanager
def embedded_guidance(model: DiffusionModel, guidance_scale: float) -> Iterator[None]:
    """On a guidance-distilled model (FLUX.1-dev) the scale is the network's guidance input while sampling, as in
    its pipeline; the training value is restored afterwards."""
    if not model.distilled_guidance:
        yield
        return
    kept, model.guidance = model.guidance, guidance_scale
    try:
        yield
    finally:
        model.guidance = kept


def _step_kwargs(scheduler: Any, generators: list, eta: float) -> dict:
    accepted = inspect.signature(scheduler.step).parameters
    kwargs: dict[str, Any] = {"return_dict": True}
    if "generator" in accepted:
        kwargs["generator"] = generators
    if "eta" in accepted:
        kwargs["eta"] = eta
    return kwargs


def to_uint8(images: Tensor) -> Tensor:
    """[B,3,H,W] in [0,1] -> [B,H,W,3] uint8, rounded as diffusers' numpy_to_pil does."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
