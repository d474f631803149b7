"""GPU training benchmark at real size: SD 1.5 (512 px) and SDXL-base (1024 px), DPO / MaPO / AlignProp, LoRA, bf16.

    bash scripts/bench_gpu.sh                                  # what to run on a CUDA machine (hard time limit)
    python scripts/bench_gpu.py --budget-s 420                 # the same, without the shell wrapper
    python scripts/bench_gpu.py --device cpu --tiny            # dry run of the same code path on tiny models (CPU)
    python scripts/bench_gpu.py --cases sdxl-dpo-ckpt,diffusers-sdxl-dpo-ckpt
    bash scripts/bench_gpu.sh --families sd35m,flux             # SD3.5 Medium and FLUX.1-dev, 1024 px (a second run)

Nothing is downloaded and nothing is read from disk: each family's architectures (the published UNet, VAE and CLIP
text-encoder configs, as in ``diffalign/models/full_size.py``) are built in memory with random weights, directly
on the device. Images are noise; shapes, memory and speed are real.

What one case measures: diffalign's own ``Trainer.train_step`` (accelerate autocast, the method's ``loss`` over the
model contract, backward, gradient clipping, AdamW step), with the Trainer built from a normal config whose model
loader and data source are replaced by the in-memory model and synthetic batches:

    cached     pair methods (DPO, MaPO) read batches in the latent-cache layout (latent mean/std + text
               conditioning, what ``diffalign cache`` writes); the VAE and text encoders stay on the CPU
               (``data.offload_encoders``), so the GPU holds the UNet, LoRA and optimizer state only
    uncached   DPO reading pixels + prompts: the VAE and both text encoders run every step, as in the diffusers
               example
    precomputed  DPO on cached batches that carry the reference's errors (``method.reference=precomputed``,
               what ``diffalign cache ... data.reference_epochs=E`` writes): no reference forward
    flow       ``--families sd35m,flux`` (not in the default run): the real-size SD3.5 Medium and FLUX.1-dev
               transformers (``models/full_size.FLOW_TRANSFORMERS``) at 1024 px, DPO / MaPO on cached batches (T5
               and CLIP conditioning at the pipelines' default lengths); no encoders are built
    alignprop  prompts -> DDIM sampling (``--alignprop-steps``, CFG 7.5, gradient through the last step) -> VAE
               decode -> aesthetic reward on a random-weight CLIP ViT-L/14 (no weights can be downloaded)

Beside diffalign, the diffusers research example ``train_diffusion_dpo_sdxl.py`` is measured on the same random
SDXL at the same settings, in the same process: "diffusers-example step, transcribed". The script itself cannot
run here (it loads from a hub folder and a datasets split, and the GPU machine has no internet), so its inner
training step is re-implemented, in our own code, from the script at diffusers commit 58eb52c0 (the script's last
change: c9c82173): the UNet wrapped by ``accelerator.prepare`` (bf16 autocast), LoRA rank r / alpha r with gaussian
init on to_q/to_k/to_v/to_out.0 left in bf16 (the script upcasts only for fp16), AdamW over the trainable
parameters, and per step: fp32 VAE encode of the 2B images, latents cast to bf16, one noise draw repeated for both
halves, timesteps repeated, ``DDPMScheduler.add_noise``, time ids, both text encoders (bf16) on token ids, the
policy UNet call on 2B, fp32 MSE, the reference UNet call with adapters disabled under no_grad, the
-0.5*beta*(model_diff - ref_diff) logsigmoid loss, backward, clip, optimizer and lr-scheduler step, zero_grad, and
the four ``.item()`` calls of its progress-bar logs. Its data loading (JPEG decode, resize, tokenizing) is left
out, which can only flatter it. With ``DIFFUSERS_DPO_SCRIPT`` pointing at the script, its step is not run from the
file (it is a 1100-line main); the transcription is what is timed.

Columns: pairs/s (prompts/s for AlignProp); peak = torch.cuda.max_memory_allocated over the timed steps (weights,
LoRA, optimizer state and whatever else the case keeps on the GPU included: the counter is reset after the warm-up
and FLOP-counting steps, whose own peak, higher under FlopCounterMode with gradient checkpointing, is kept in
results.jsonl as peak_warmup_gib); TFLOP/step counted with
torch.utils.flop_counter.FlopCounterMode over one extra step (executed FLOPs: gradient-checkpointing recomputation
counts); % peak = achieved FLOP/s over the GPU's dense bf16 peak (a table keyed by device name; "unknown" when the
name is not in it). Each row is printed as soon as its case ends; a case that fails (OOM, ...) prints its error and
the run goes on; a case that would pass its time share is stopped and reports the steps it finished; SIGTERM
(the shell's timeout) prints the table so far.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Dense bf16 peak FLOP/s (no sparsity), by a substring of torch.cuda.get_device_name(); first match wins.
BF16_PEAK_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H800", 989.0), ("GH200", 989.0),
                    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0),
                    ("RTX 4090", 165.0), ("RTX 6000 Ada", 364.0), ("A10G", 70.0), ("L4", 121.0)]

PROMPTS = ["a photograph of an astronaut riding a horse", "a red fox in the snow, golden hour",
           "a bowl of ramen on a wooden table", "an oil painting of a lighthouse in a storm"]

# OpenAI CLIP ViT-L/14 (the aesthetic predictor's backbone) as a transformers CLIPConfig, for random weights.
CLIP_L14 = {"projection_dim": 768,
            "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                            "num_attention_heads": 12, "max_position_embeddings": 77, "vocab_size": 49408},
            "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                              "num_attention_heads": 16, "image_size": 224, "patch_size": 14}}
CLIP_TINY = {"projection_dim": 16,
             "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                             "num_attention_heads": 2, "max_position_embeddings": 77, "vocab_size": 49408},
             "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                               "num_attention_heads": 2, "image_size": 32, "patch_size": 8}}


@dataclass
class Case:
    name: str
    family: str            # sd15 | sdxl | sd35m | flux
    method: str            # dpo | mapo | alignprop | diffusers-dpo
    ckpt: bool             # gradient checkpointing
    data: str = "cached"   # cached | uncached | precomputed | prompts
    compile: bool = False  # train.compile (regional torch.compile of the UNet's transformer blocks)
    channels_last: bool = False   # train.channels_last (NHWC convolution weights)
    result: dict = field(default_factory=dict)


def all_cases() -> list[Case]:
    """In priority order: what the issue's targets need first, so a short budget still measures them."""
    cases = []
    for fam in ("sdxl", "sd15"):
        for ck, suffix in ((True, "-ckpt"), (False, "")):
            cases += [Case(f"{fam}-dpo{suffix}", fam, "dpo", ck),
                      Case(f"diffusers-{fam}-dpo{suffix}", fam, "diffusers-dpo", ck, "uncached")]
            if ck:
                cases += [Case(f"{fam}-dpo-uncached{suffix}", fam, "dpo", ck, "uncached"),
                          Case(f"{fam}-dpo-precomputed{suffix}", fam, "dpo", ck, "precomputed")]
        cases += [Case(f"{fam}-mapo-ckpt", fam, "mapo", True), Case(f"{fam}-mapo", fam, "mapo", False),
                  Case(f"{fam}-alignprop-ckpt", fam, "alignprop", True, "prompts"),
                  Case(f"{fam}-alignprop", fam, "alignprop", False, "prompts")]
    cases = [c for c in cases if not (c.family == "sd15" and c.method == "diffusers-dpo")]  # the SDXL script only
    # last, so they cannot cost the rows above their time (compiling is slow): whether the two options pay off
    cases += [Case("sdxl-dpo-ckpt-channels-last", "sdxl", "dpo", True, channels_last=True),
              Case("sdxl-dpo-ckpt-compile", "sdxl", "dpo", True, compile=True)]
    # the flow families (not in the default --families: a run of their own, `--families sd35m,flux`)
    for fam in FLOW_FAMILIES:
        cases += [Case(f"{fam}-dpo-ckpt", fam, "dpo", True), Case(f"{fam}-dpo-precomputed-ckpt", fam, "dpo", True,
                                                                    "precomputed"),
                  Case(f"{fam}-mapo-ckpt", fam, "mapo", True), Case(f"{fam}-dpo", fam, "dpo", False)]
    return cases


# ------------------------------------------------------------------------------------------------ components
FLOW_FAMILIES = ("sd35m", "flux")        # SD3.5 Medium and FLUX.1-dev at 1024 px: pair methods on cached batches


def seeded_build(device: Any, dtype: Any, make: Any) -> Any:
    """``make()`` under seed 1, on ``device``, with ``dtype`` as the default dtype: every case's network starts
    from the same weights, built in its storage dtype (half the memory of building in fp32)."""
    import torch

    default = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(1)
        torch.set_default_dtype(dtype)
        try:
            return make()
        finally:
            torch.set_default_dtype(default)


def pair_meta(b: int, resolution: int) -> dict:
    """What a batch of B pairs carries besides its latents or pixels: sizes, crops, indices."""
    import torch

    return {"original_sizes": torch.full((2 * b, 2), resolution, dtype=torch.long),
            "crops": torch.zeros(2 * b, 2, dtype=torch.long), "indices": torch.arange(b), "num_skipped": 0}


class Family:
    """One family's frozen parts (VAE, text encoders, tokenizers, schedule), kept on the CPU between cases; the UNet
    is built afresh, with the same seed, for every case."""

    def __init__(self, name: str, device: Any, tiny: bool) -> None:
        import torch

        from diffalign.models import SDModel, SDXLModel
        from diffalign.models.schedules import schedule_for
        from diffalign.models.tiny import _scheduler

        self.name, self.device, self.tiny = name, device, tiny
        self.model_class = SDXLModel if name == "sdxl" else SDModel
        self.unet_preset = f"tiny-{name}" if tiny else name
        self.resolution = 64 if tiny else (1024 if name == "sdxl" else 512)
        self.scheduler_config = dict(_scheduler("epsilon").config)
        self.schedule = schedule_for(self.scheduler_config)
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(0)
            self.vae, self.text_encoders, self.tokenizers = self._build_encoders()
        for module in (self.vae, *self.text_encoders):
            module.requires_grad_(False).eval().to("cpu")

    def _build_encoders(self) -> tuple[Any, list, list]:
        import torch

        if self.tiny:
            from diffalign.models.tiny import _pipeline

            pipe = _pipeline(self.name, "epsilon")
            encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if self.name == "sdxl" else [])
            tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if self.name == "sdxl" else [])
            return pipe.vae, [e.to(torch.bfloat16) for e in encoders], tokenizers
        from diffusers import AutoencoderKL

        from diffalign.models.full_size import _FAMILIES, _VAE, _text_encoder
        from diffalign.models.tiny import clip_tokenizer

        spec = _FAMILIES[self.name]
        vae = AutoencoderKL(**_VAE, **spec["vae"])                                      # fp32, as model.vae_dtype
        encoders = [_text_encoder(text, proj).to(torch.bfloat16) for _, _, text, proj, _ in spec["text"]]
        tokenizers = [clip_tokenizer(pad_token=pad) for *_, pad in spec["text"]]
        return vae, encoders, tokenizers

    def build_unet(self, dtype: Any) -> Any:
        from diffusers import UNet2DConditionModel

        from diffalign.models.tiny import unet_config

        unet = seeded_build(self.device, dtype, lambda: UNet2DConditionModel(**unet_config(self.unet_preset)))
        return unet.requires_grad_(False).eval()

    def model(self, dtype: Any, encoders_on_device: bool) -> Any:
        """The family's DiffusionModel over a fresh UNet; VAE and text encoders on the device only when asked."""
        where = self.device if encoders_on_device else "cpu"
        for module in (self.vae, *self.text_encoders):
            module.to(where)
        model = self.model_class(self.build_unet(dtype), self.vae, self.text_encoders, self.tokenizers,
                                 self.schedule, source=f"random {self.unet_preset}")
        return model

    def release(self) -> None:
        for module in (self.vae, *self.text_encoders):
            module.to("cpu")

    # ------------------------------------------------------------------------------------------ synthetic batches
    def latent_hw(self) -> int:
        return self.resolution // 8

    def cached_batch(self, b: int) -> dict:
        """The latent-cache layout (data/cache.py): latent mean/std [2B,4,h,w] and the B prompts' conditioning."""
        import torch

        h, width = self.latent_hw(), self.text_encoders[-1].config.hidden_size
        hidden = sum(e.config.hidden_size for e in self.text_encoders) if self.name == "sdxl" else width
        cond = {"hidden": torch.randn(b, 77, hidden)}
        if self.name == "sdxl":
            cond["pooled"] = torch.randn(b, self.text_encoders[-1].config.projection_dim)
        return {"latent_mean": torch.randn(2 * b, 4, h, h), "latent_std": torch.full((2 * b, 4, h, h), 0.01),
                "cond": cond, **pair_meta(b, self.resolution)}

    def pixel_batch(self, b: int) -> dict:
        """The decoded-pairs layout (data/pairs.py collate_pairs): pixels [2B,3,H,W] in [-1,1] and B prompts."""
        import torch

        r = self.resolution
        return {"pixels": torch.rand(2 * b, 3, r, r) * 2 - 1, "prompts": [PROMPTS[i % 4] for i in range(b)],
                **pair_meta(b, self.resolution)}

    def prompt_batch(self, b: int) -> dict:
        import torch

        return {"prompts": [PROMPTS[i % 4] for i in range(b)], "indices": torch.arange(b),
                "size": (self.resolution, self.resolution)}


class FlowFamily:
    """SD3.5 Medium or FLUX.1-dev: the real-size transformer (``models/full_size.FLOW_TRANSFORMERS``) built afresh,
    with the same seed, for every case; cached batches only, so no text encoder or VAE weights are built (the
    VAE stands in for its latent factor and channels)."""

    def __init__(self, name: str, device: Any, tiny: bool) -> None:
        from diffalign.models import FluxModel, SD3Model
        from diffalign.models.full_size import flow_scheduler
        from diffalign.models.schedules import FlowSchedule
        from diffalign.models.tiny import _flow_vae

        self.name, self.device, self.tiny = name, device, tiny
        self.model_class = SD3Model if name == "sd35m" else FluxModel
        self.unet_preset = f"tiny-{name}" if tiny else name
        self.resolution = 64 if tiny else 1024
        self.schedule = FlowSchedule(dict(flow_scheduler(name).config))
        self.vae = _flow_vae(1.0, 0.0)

    def build_transformer(self, dtype: Any) -> Any:
        import diffusers

        from diffalign.models.full_size import FLOW_TRANSFORMERS
        from diffalign.models.tiny import _flux_pipeline, _sd3_pipeline

        def make() -> Any:
            if self.tiny:
                return (_sd3_pipeline() if self.name == "sd35m" else _flux_pipeline()).transformer
            name, config = FLOW_TRANSFORMERS[self.name]
            return getattr(diffusers, name)(**config)

        model = seeded_build(self.device, dtype, make)
        for buffer in model.buffers():       # SD3's fp32 position table in bf16, as from_pretrained(torch_dtype) has it
            buffer.data = buffer.data.to(dtype) if buffer.is_floating_point() else buffer.data
        self.config = model.config          # what the cached batches' widths follow
        return model.to(self.device).requires_grad_(False).eval()

    def model(self, dtype: Any, encoders_on_device: bool) -> Any:
        return self.model_class(self.build_transformer(dtype), self.vae, [], [], self.schedule,
                                source=f"random {self.unet_preset}")

    def release(self) -> None:
        pass

    def cached_batch(self, b: int) -> dict:
        """The latent-cache layout: 16-channel latents and T5 + CLIP conditioning at the pipelines' default lengths
        (SD3: 77 CLIP + 256 T5 tokens; FLUX.1-dev: 512 T5 tokens)."""
        import torch

        h, length = self.resolution // 8, self.model_class.max_sequence_length
        tokens = 77 + length if self.name == "sd35m" else length
        cond = {"hidden": torch.randn(b, tokens, self.config.joint_attention_dim),
                "pooled": torch.randn(b, self.config.pooled_projection_dim)}
        return {"latent_mean": torch.randn(2 * b, 16, h, h), "latent_std": torch.full((2 * b, 16, h, h), 0.01),
                "cond": cond, **pair_meta(b, self.resolution)}


# ------------------------------------------------------------------------------------------------ diffalign's step
class _NoData:
    """Stands in for the dataset the Trainer opens; batches are handed to train_step directly."""

    def __len__(self) -> int:
        return 1 << 20

    def set_epoch(self, epoch: int) -> None:
        pass


@contextlib.contextmanager
def patched_trainer(model: Any):
    """diffalign.trainer with its model loader returning ``model`` and its data source a stub."""
    import diffalign.trainer as trainer_module

    saved = trainer_module.load_model, trainer_module.open_training_data
    trainer_module.load_model = lambda *args, **kwargs: model
    trainer_module.open_training_data = lambda *args, **kwargs: _NoData()
    try:
        yield trainer_module.Trainer
    finally:
        trainer_module.load_model, trainer_module.open_training_data = saved


class DiffalignStep:
    """One case of diffalign: a Trainer over the in-memory model; ``step()`` is ``Trainer.train_step``."""

    def __init__(self, case: Case, fam: Family | FlowFamily, args: argparse.Namespace, out: Path) -> None:
        import torch

        from diffalign.config import load_config

        overrides = [f"model.pretrained={fam.unet_preset}", "data.path=synthetic", f"output_dir={out}",
                     f"data.resolution={fam.resolution}", f"train.batch_size={args.batch}", "data.num_workers=0",
                     f"lora.rank={args.rank}", "train.report_to=none", "train.mixed_precision=bf16",
                     f"train.gradient_checkpointing={str(case.ckpt).lower()}", "train.lr=1e-5",
                     "train.lr_scheduler=constant", f"method.name={case.method}", "train.checkpoint_every=0"]
        if case.data == "precomputed":
            overrides.append("method.reference=precomputed")
        if case.compile:
            overrides.append("train.compile=true")
        if case.channels_last:
            overrides.append("train.channels_last=true")
        if case.method == "alignprop":
            reward = {"name": "aesthetic", "mlp_checkpoint": None,
                      "model_config": CLIP_TINY if args.tiny else CLIP_L14}
            overrides += [f"method.reward={json.dumps(reward)}", f"method.num_steps={args.alignprop_steps}",
                          f"data.prompts={json.dumps(PROMPTS)}"]
        cfg = load_config(None, overrides)
        self.model = fam.model(torch.bfloat16, encoders_on_device=case.data not in ("cached", "precomputed"))
        with patched_trainer(self.model) as trainer_class:
            self.trainer = trainer_class(cfg)
        if case.data == "cached":
            self.batch = fam.cached_batch(args.batch)
        elif case.data == "precomputed":          # the values do not matter for speed; their presence does
            self.batch = {**fam.cached_batch(args.batch), "ref_errors": torch.rand(args.batch, 2)}
        elif case.data == "uncached":
            self.batch = fam.pixel_batch(args.batch)
        else:
            self.batch = fam.prompt_batch(args.batch)

    def step(self) -> None:
        self.trainer.train_step(iter([self.batch]))

    def close(self) -> None:
        self.trainer.acc.free_memory()
        del self.trainer, self.model


# ------------------------------------------------------------------------------------------------ diffusers' step
class DiffusersExampleStep:
    """diffusers-example step, transcribed: the inner loop of examples/research_projects/diffusion_dpo/
    train_diffusion_dpo_sdxl.py (diffusers 58eb52c0) in our own code, on the same random SDXL (see the module
    docstring for the sequence). Only the per-step work is kept; its data loading is left out."""

    def __init__(self, case: Case, fam: Family | FlowFamily, args: argparse.Namespace) -> None:
        import torch
        from accelerate import Accelerator
        from diffusers import DDPMScheduler
        from diffusers.optimization import get_scheduler
        from peft import LoraConfig

        self.fam, self.beta_dpo, self.resolution = fam, 5000.0, fam.resolution
        self.acc = Accelerator(mixed_precision="bf16")
        self.weight_dtype = torch.bfloat16
        self.noise_scheduler = DDPMScheduler.from_config(fam.scheduler_config)
        self.text_encoders = [e.to(self.acc.device, dtype=self.weight_dtype) for e in fam.text_encoders]
        self.vae = fam.vae.to(self.acc.device, dtype=torch.float32)          # "always in float32"
        unet = fam.build_unet(self.weight_dtype)
        unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        if case.ckpt:
            unet.enable_gradient_checkpointing()
        self.params = [p for p in unet.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.params, lr=1e-5, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=10**6)
        self.unet, self.optimizer, self.lr_scheduler = self.acc.prepare(unet, optimizer, lr_scheduler)
        self.unet.train()
        self.batch = self._collated(args.batch)

    def _collated(self, b: int) -> dict:
        """What the script's collate_fn yields (moved to the device by accelerate's prepared dataloader)."""
        import torch

        r, device = self.resolution, self.acc.device
        ids = [tok([PROMPTS[i % 4] for i in range(b)], max_length=tok.model_max_length, padding="max_length",
                   truncation=True, return_tensors="pt").input_ids.to(device) for tok in self.fam.tokenizers]
        return {"pixel_values": (torch.rand(b, 6, r, r, device=device) * 2 - 1).float(),  # [B, 2*3, H, W]: w | l
                "input_ids_one": ids[0], "input_ids_two": ids[1],
                "original_sizes": [(r, r)] * b, "crop_top_lefts": [(0, 0)] * b}

    def _prompt_embeds(self, batch: dict) -> tuple[Any, Any]:
        import torch

        per_encoder, pooled = [], None
        for encoder, ids in zip(self.text_encoders, (batch["input_ids_one"], batch["input_ids_two"]), strict=True):
            out = encoder(ids.to(encoder.device), output_hidden_states=True)
            pooled = out[0]                                   # the last encoder's first output
            per_encoder.append(out.hidden_states[-2])
        return torch.concat(per_encoder, dim=-1), pooled.view(pooled.shape[0], -1)

    def step(self) -> None:
        import torch
        import torch.nn.functional as F

        acc, batch, unwrap = self.acc, self.batch, self.acc.unwrap_model
        with acc.accumulate(self.unet):
            pixels = batch["pixel_values"].to(dtype=self.vae.dtype)
            feed = torch.cat(pixels.chunk(2, dim=1))                                    # [2B, 3, H, W]
            latents = torch.cat([self.vae.encode(feed[i:i + 8]).latent_dist.sample() for i in range(0, len(feed), 8)])
            latents = (latents * self.vae.config.scaling_factor).to(self.weight_dtype)
            noise = torch.randn_like(latents).chunk(2)[0].repeat(2, 1, 1, 1)
            bsz = latents.shape[0] // 2
            timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (bsz,),
                                      device=latents.device, dtype=torch.long).repeat(2)
            noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
            target_size = (self.resolution, self.resolution)
            time_ids = torch.cat([torch.tensor([list(s + c + target_size)]).to(acc.device, dtype=self.weight_dtype)
                                  for s, c in zip(batch["original_sizes"], batch["crop_top_lefts"], strict=True)])
            time_ids = time_ids.repeat(2, 1)
            prompt_embeds, pooled = self._prompt_embeds(batch)
            prompt_embeds, pooled = prompt_embeds.repeat(2, 1, 1), pooled.repeat(2, 1)
            cond = {"time_ids": time_ids, "text_embeds": pooled}
            pred = self.unet(noisy, timesteps, prompt_embeds, added_cond_kwargs=cond).sample
            target = noise                                                              # epsilon prediction
            losses = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
            losses_w, losses_l = losses.chunk(2)
            raw_model_loss = 0.5 * (losses_w.mean() + losses_l.mean())
            model_diff = losses_w - losses_l
            unwrap(self.unet).disable_adapters()
            with torch.no_grad():
                ref_pred = self.unet(noisy, timesteps, prompt_embeds, added_cond_kwargs=cond).sample
                ref_losses = F.mse_loss(ref_pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
                ref_w, ref_l = ref_losses.chunk(2)
                ref_diff, raw_ref_loss = ref_w - ref_l, ref_losses.mean()
            unwrap(self.unet).enable_adapters()
            inside = -0.5 * self.beta_dpo * (model_diff - ref_diff)
            loss = -F.logsigmoid(inside).mean()
            implicit_acc = (inside > 0).sum().float() / inside.size(0)
            implicit_acc += 0.5 * (inside == 0).sum().float() / inside.size(0)
            acc.backward(loss)
            if acc.sync_gradients:
                acc.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad()
        _ = {"loss": loss.detach().item(), "raw_model_loss": raw_model_loss.detach().item(),
             "ref_loss": raw_ref_loss.detach().item(), "implicit_acc": implicit_acc.detach().item()}

    def close(self) -> None:
        self.acc.free_memory()
        del self.unet, self.optimizer, self.lr_scheduler


# ------------------------------------------------------------------------------------------------ timing
class CaseTimeout(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise CaseTimeout


def sync(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def count_flops(step: Any) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def measure(runner: Any, args: argparse.Namespace, res: dict, deadline: float) -> None:
    """Warm-up steps, one FLOP-counted step, then timed steps until args.steps or the deadline (results in res)."""
    import torch

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        runner.step()
    sync(args.device)
    res["warmup_s"] = time.perf_counter() - t0             # includes torch.compile's compiling, if any
    if args.flops:
        res["flops"] = count_flops(runner.step)
        sync(args.device)
    if torch.device(args.device).type == "cuda":   # FlopCounterMode keeps checkpointed activations alive longer
        res["peak_warmup_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(args.steps):
        runner.step()
        sync(args.device)
        res["steps"], res["seconds"] = i + 1, time.perf_counter() - t0
        if time.perf_counter() + res["seconds"] / (i + 1) > deadline:
            res["note"] = f"stopped at {i + 1} steps (time share)"
            break


def run_case(case: Case, fam: Family | FlowFamily, args: argparse.Namespace, seconds: float, work: Path) -> dict:
    """Build the case, measure it within ``seconds`` (SIGALRM stops it), free it; a failure is recorded, not raised."""
    import torch

    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    res: dict = {"steps": 0}
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    runner = None
    started = time.perf_counter()
    try:
        if case.method == "diffusers-dpo":
            runner = DiffusersExampleStep(case, fam, args)
        else:
            runner = DiffalignStep(case, fam, args, work / case.name)
        sync(args.device)
        res["build_s"] = time.perf_counter() - started
        measure(runner, args, res, started + seconds * 0.9)
    except CaseTimeout:
        res["error"] = f"time share of {seconds:.0f} s ran out"
    except Exception as err:  # noqa: BLE001 (any failure becomes a row: OOM, a missing kernel, ...)
        kind = "OOM" if "out of memory" in str(err).lower() else type(err).__name__
        res["error"] = f"{kind}: {str(err).splitlines()[0][:160] if str(err) else ''}"
        if args.verbose:
            traceback.print_exc()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        if cuda:
            res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if runner is not None:
            with contextlib.suppress(Exception):
                runner.close()
        del runner
        fam.release()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            res["left_gib"] = torch.cuda.memory_allocated() / 2**30
        res["case_s"] = time.perf_counter() - started
    return res


# ------------------------------------------------------------------------------------------------ table
HEADER = ("| case | method | data | ckpt | steps | s/step | pairs/s | peak GiB | TFLOP/step | TFLOP/s | % bf16 peak "
          "| note |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def peak_tflops(device: Any) -> tuple[str, float | None]:
    import torch

    if torch.device(device).type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name()
    for key, value in BF16_PEAK_TFLOPS:
        if key in name:
            return name, value
    return name, None


def row(case: Case, peak: float | None) -> str:
    r = case.result
    unit = "prompts/s" if case.method == "alignprop" else "pairs/s"
    cells = [case.name, case.method, case.data, "on" if case.ckpt else "off", str(r.get("steps", 0))]
    if r.get("steps"):
        s_step = r["seconds"] / r["steps"]
        r["s_per_step"], r["rate"], r["unit"] = s_step, r["batch"] / s_step, unit
        cells += [f"{s_step:.3f}", f"{r['rate']:.2f}" + (" (prompts)" if unit == "prompts/s" else "")]
    else:
        cells += ["-", "-"]
    cells.append(f"{r['peak_gib']:.2f}" if "peak_gib" in r else "-")
    if "flops" in r:
        cells.append(f"{r['flops'] / 1e12:.3g}")
        if r.get("steps"):
            achieved = r["flops"] / r["s_per_step"] / 1e12
            r["tflops_per_s"] = achieved
            cells.append(f"{achieved:.3g}")
            cells.append(f"{100 * achieved / peak:.1f}%" if peak else "unknown")
        else:
            cells += ["-", "-"]
    else:
        cells += ["-", "-", "-"]
    leak = f"{r['left_gib']:.2f} GiB still allocated after the case" if r.get("left_gib", 0) > 0.05 else None
    compiled = f"train.compile; warm-up {r['warmup_s']:.0f} s" if case.compile and "warmup_s" in r else None
    cells.append("; ".join(x for x in (r.get("error"), r.get("note"), compiled, leak) if x) or "")
    return "| " + " | ".join(cells) + " |"


class Report:
    """Prints and appends rows as they come; ``summary`` compares with the diffusers step and the targets."""

    def __init__(self, path: Path | None) -> None:
        self.path, self.cases, self.lines = path, [], []

    def emit(self, text: str) -> None:
        print(text, flush=True)
        self.lines.append(text)
        if self.path is not None:
            with open(self.path, "a") as fh:
                fh.write(text + "\n")

    def summary(self, peak: float | None) -> None:
        done = {c.name: c.result for c in self.cases}
        self.emit("")
        for fam in ("sdxl",):
            for ck in ("-ckpt", ""):
                ours, theirs = done.get(f"{fam}-dpo{ck}", {}), done.get(f"diffusers-{fam}-dpo{ck}", {})
                unc = done.get(f"{fam}-dpo-uncached{ck}", {})
                pre = done.get(f"{fam}-dpo-precomputed{ck}", {})
                if ours.get("rate") and theirs.get("rate"):
                    text = f"{fam} DPO{' (ckpt)' if ck else ''}: diffalign cached / diffusers example = " \
                           f"{ours['rate'] / theirs['rate']:.2f}x"
                    if unc.get("rate"):
                        text += f"; diffalign uncached / diffusers example = {unc['rate'] / theirs['rate']:.2f}x"
                    if pre.get("rate"):
                        text += f"; precomputed reference / diffusers example = {pre['rate'] / theirs['rate']:.2f}x"
                    self.emit(text + " (target >= 1.5x)")
        dpo = done.get("sdxl-dpo-ckpt", {})
        if "peak_gib" in dpo and dpo.get("steps"):
            fits = "fits" if dpo["peak_gib"] * 2**30 < 24e9 else "does NOT fit"
            self.emit(f"sdxl DPO LoRA ckpt {dpo['peak_gib']:.2f} GiB peak allocated: {fits} in 24 GB "
                      "(allocator reserve and CUDA context come on top)")
        nhwc = done.get("sdxl-dpo-ckpt-channels-last", {})
        if nhwc.get("rate") and dpo.get("rate"):
            self.emit(f"sdxl DPO (ckpt) with train.channels_last / without = {nhwc['rate'] / dpo['rate']:.2f}x")
        compiled = done.get("sdxl-dpo-ckpt-compile", {})
        if compiled.get("rate") and dpo.get("rate"):
            self.emit(f"sdxl DPO (ckpt) with train.compile / without = {compiled['rate'] / dpo['rate']:.2f}x, after "
                      f"{compiled.get('warmup_s', 0):.0f} s of warm-up steps (compiling)")
        best = max((r.get("tflops_per_s", 0) for n, r in done.items() if n.startswith("sdxl-dpo")), default=0)
        if best and peak:
            self.emit(f"best SDXL DPO step: {100 * best / peak:.1f}% of bf16 dense peak (target >= 40%)")


# ------------------------------------------------------------------------------------------------ main
def _commit() -> str:
    """The checkout's commit: $DIFFALIGN_COMMIT (a copy without .git, such as a GPU machine's), else git's."""
    if os.environ.get("DIFFALIGN_COMMIT"):
        return os.environ["DIFFALIGN_COMMIT"]
    import subprocess
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown commit"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for the dry run")
    parser.add_argument("--tiny", action="store_true", help="tiny random models at 64 px (the CPU dry run)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget for the whole run")
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all, in priority order)")
    parser.add_argument("--families", default="sdxl,sd15")
    parser.add_argument("--list", action="store_true", help="print the case names and exit")
    parser.add_argument("--batch", type=int, default=1, help="pairs (or prompts) per step")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (diffalign's default; the example's is 4)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per case (fewer when time runs short)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--alignprop-steps", type=int, default=20, help="DDIM steps per AlignProp trajectory")
    parser.add_argument("--no-flops", dest="flops", action="store_false", help="skip the FlopCounterMode step")
    parser.add_argument("--out", default=None,
                        help="folder for table.md and results.jsonl ($OUT, else ./bench_gpu_out)")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failed cases")
    args = parser.parse_args()
    started = time.perf_counter()
    cases = [c for c in all_cases() if c.family in args.families.split(",")]
    if args.cases:
        wanted = args.cases.split(",")
        unknown = set(wanted) - {c.name for c in cases}
        if unknown:
            sys.exit(f"unknown cases {sorted(unknown)}; --list shows them")
        cases = [c for c in cases if c.name in wanted]
    if args.list:
        print("\n".join(c.name for c in cases))
        return
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DIFFALIGN_LOG", "WARNING")
    out = Path(args.out or os.environ.get("OUT") or "bench_gpu_out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text("")
    report = Report(out / "table.md")
    report.emit(f"# diffalign GPU benchmark  (budget {args.budget_s:.0f} s)")

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --device cpu --tiny for the dry run")
    torch.backends.cuda.matmul.allow_tf32 = False       # the diffusers example's default (--allow_tf32 off)
    device_name, peak = peak_tflops(args.device)
    import accelerate
    import diffusers
    import peft
    import transformers

    report.emit(f"device {device_name}; bf16 dense peak {peak if peak else 'unknown'} TFLOP/s; torch "
                f"{torch.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}, accelerate "
                f"{accelerate.__version__}, transformers {transformers.__version__}, diffalign {_commit()}")
    report.emit(f"{'tiny' if args.tiny else 'full-size'} random weights, batch {args.batch}, LoRA rank {args.rank}, "
                f"bf16 autocast, AlignProp {args.alignprop_steps} DDIM steps (CFG 7.5, K=1), "
                f"{args.warmup} warm-up + up to {args.steps} timed steps per case")
    script = os.environ.get("DIFFUSERS_DPO_SCRIPT")
    report.emit("diffusers rows: diffusers-example step, transcribed (train_diffusion_dpo_sdxl.py @ 58eb52c0)"
                + (f"; DIFFUSERS_DPO_SCRIPT={script} is not executed" if script else ""))
    report.emit("")
    report.emit(HEADER)
    _on_term(report, peak)
    fams: dict[str, Family | FlowFamily] = {}
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    for i, case in enumerate(cases):
        left = args.budget_s - (time.perf_counter() - started)
        share = left / (len(cases) - i) * (1.6 if i < len(cases) - 1 else 1.0)
        if left < 15:
            case.result = {"steps": 0, "error": "skipped: budget spent"}
        else:
            try:
                if case.family not in fams:
                    t0 = time.perf_counter()
                    make = FlowFamily if case.family in FLOW_FAMILIES else Family
                    fams[case.family] = make(case.family, args.device, args.tiny)
                    print(f"  ({case.family} encoders built in {time.perf_counter() - t0:.1f} s)", flush=True)
                case.result = run_case(case, fams[case.family], args, min(share, left - 5), work)
            except Exception as err:  # noqa: BLE001
                case.result = {"steps": 0, "error": f"{type(err).__name__}: {str(err)[:160]}"}
        case.result["batch"] = args.batch
        report.cases.append(case)
        report.emit(row(case, peak))
        with open(out / "results.jsonl", "a") as fh:
            fh.write(json.dumps({"case": case.name, "family": case.family, "method": case.method,
                                 "data": case.data, "ckpt": case.ckpt, **case.result}) + "\n")
    report.summary(peak)
    report.emit(f"total {time.perf_counter() - started:.0f} s; table in {out / 'table.md'}")


def _on_term(report: Report, peak: float | None) -> None:
    def handler(signum: int, frame: Any) -> None:
        report.emit(f"| (killed by signal {signum}: the rows above are what finished) |")
        with contextlib.suppress(Exception):
            report.summary(peak)
        sys.stdout.flush()
        os._exit(3)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


if __name__ == "__main__":
    main()
