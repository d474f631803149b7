"""Predicted peak GPU memory of diffalign training steps, without a GPU: the step runs on fake tensors.

    python scripts/estimate_gpu_memory.py                       # SDXL 1024 px and SD 1.5 512 px, DPO/MaPO/AlignProp
    python scripts/estimate_gpu_memory.py --cases sdxl-dpo-ckpt --flops
    python scripts/estimate_gpu_memory.py --cases sdxl-dpo-ckpt-full,sdxl-dpo-ckpt-full-precomputed   # full FT

Every case builds the real-size UNet (and, where the step needs them, the VAE, both text encoders and the reward's
CLIP ViT-L/14) inside ``torch._subclasses.FakeTensorMode``, so no weight is allocated and no kernel runs, then does
what ``Trainer.train_step`` does, with diffalign's own code: ``make_trainable`` (LoRA rank 8 in fp32, gradient
checkpointing when asked), ``build_optimizer`` (AdamW), bf16 autocast around the method's ``loss(model, batch)``,
backward, gradient clipping, optimizer step, zero_grad; two steps, so the second holds the AdamW state. A
TorchDispatchMode below the fake mode counts the bytes of every live tensor storage (weights included) and keeps
the maximum: the predicted ``torch.cuda.max_memory_allocated``.

How it differs from the GPU (the reasons the numbers are an estimate, not a measurement):

- The fake device is the CPU, not ``cuda``: with fake CUDA tensors the forward runs, but autograd's backward needs
  an initialised CUDA context (pytorch/pytorch#92627), which a machine without a GPU cannot give. So autocast is
  the CPU's bf16 autocast (its op lists are close to CUDA's: matmuls and convolutions in bf16, norms in fp32) and
  SDPA takes the CPU flash kernel, which, like CUDA's flash/efficient kernels, saves only the output and the
  log-sum-exp for backward.
- torch.distributed._tools.mem_tracker.MemTracker was tried first: in this torch it registers gradient hooks on
  frozen parameters (a RuntimeError under LoRA) and, once that is worked around, its per-module hooks make one
  fake SDXL forward take about six minutes; the counter here gives the same total in seconds, and the
  breakdown (weights, LoRA gradients, AdamW state, the rest = activations and temporaries) is derived from it.
- Not counted: the caching allocator's rounding and fragmentation (``max_memory_reserved`` is higher), the CUDA
  context and cuBLAS/cuDNN workspaces outside the allocator, CUDA's foreach AdamW temporaries (a few MiB for LoRA).
- Pair methods (DPO, MaPO) read the latent cache, so the VAE and text encoders are not on the GPU
  (``data.offload_encoders``). AlignProp runs ``--alignprop-steps`` sampler steps (memory does not depend on the
  no-grad steps, only on the K=1 gradient step), the fp32 VAE decode with gradient and a random-weight CLIP
  ViT-L/14 aesthetic reward.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_gpu import CLIP_L14, CLIP_TINY, PROMPTS  # noqa: E402  (the benchmark's prompts and reward config)

GiB = 2**30


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of live tensor storages (each storage once) and keeps the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.current = self.peak = 0
        self.seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def add(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        if st in self.seen:
            return
        n = st.nbytes()
        self.seen[st] = n
        weakref.finalize(st, self._free, n)
        self.current += n
        self.peak = max(self.peak, self.current)

    def _free(self, n: int) -> None:
        self.current -= n

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.add(t)
        return out


@contextlib.contextmanager
def fake_friendly():
    """Patches, undone on exit, that let the real code run on fake tensors:

    - ``Module.to`` on fake parameters swaps tensors, which fails on the fake mode's weak references: fall back to
      assigning ``.data`` (the result is the same parameter object holding the converted tensor);
    - the reward's range check reads values (``tolist``), which fake tensors do not have: skipped.
    """
    import diffalign.rewards.base as reward_base

    swap, check = torch.utils.swap_tensors, reward_base.check_images

    def swap_or_assign(t1: torch.Tensor, t2: torch.Tensor) -> None:
        try:
            swap(t1, t2)
        except RuntimeError:
            with torch.no_grad():
                t1.data = t2.data if isinstance(t2, torch.nn.Parameter) else t2

    torch.utils.swap_tensors = swap_or_assign
    reward_base.check_images = lambda images, name="reward": None
    try:
        yield
    finally:
        torch.utils.swap_tensors, reward_base.check_images = swap, check


def build_model(family: str, tiny: bool, encoders: bool) -> Any:
    """The family's DiffusionModel with a bf16 UNet (and bf16 text encoders + fp32 VAE when ``encoders``)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from diffalign.models import SDModel, SDXLModel
    from diffalign.models.full_size import _FAMILIES, _VAE, _text_encoder
    from diffalign.models.schedules import schedule_for
    from diffalign.models.tiny import _pipeline, _scheduler, clip_tokenizer, unet_config

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        unet = UNet2DConditionModel(**unet_config(f"tiny-{family}" if tiny else family))
    finally:
        torch.set_default_dtype(default)
    vae, text_encoders, tokenizers = None, [], []
    if encoders and tiny:
        pipe = _pipeline(family, "epsilon")
        vae = pipe.vae
        text_encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
        tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if family == "sdxl" else [])
    elif encoders:
        spec = _FAMILIES[family]
        vae = AutoencoderKL(**_VAE, **spec["vae"])
        text_encoders = [_text_encoder(text, proj) for _, _, text, proj, _ in spec["text"]]
        tokenizers = [clip_tokenizer(pad_token=pad) for *_, pad in spec["text"]]
    else:   # cached latents: the VAE's config is still read (latent factor), its weights are never used
        vae = AutoencoderKL(**{**_VAE, "block_out_channels": (8, 8, 8, 8), "norm_num_groups": 8})
    text_encoders = [e.to(torch.bfloat16) for e in text_encoders]
    cls = SDXLModel if family == "sdxl" else SDModel
    model = cls(unet, vae, text_encoders, tokenizers, schedule_for(dict(_scheduler("epsilon").config)))
    real_grid = model.sampling_steps

    def sampling_steps(num_steps: int, latent_shape: Any) -> list[tuple]:
        """The sampler grid is host-side bookkeeping (ints read from a scheduler's tensors): computed for real."""
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():
            return real_grid(num_steps, latent_shape)

    model.sampling_steps = sampling_steps
    for module in model.modules():
        module.requires_grad_(False).eval()
    return model


def batch_for(family: str, method: str, resolution: int, b: int, model: Any) -> dict:
    if method == "alignprop":
        return {"prompts": [PROMPTS[i % 4] for i in range(b)], "indices": torch.arange(b),
                "size": (resolution, resolution)}
    h = resolution // 8
    unet_cfg = model.denoiser.config
    cond = {"hidden": torch.randn(b, 77, unet_cfg.cross_attention_dim)}
    if family == "sdxl":
        pooled = unet_cfg.projection_class_embeddings_input_dim - 6 * unet_cfg.addition_time_embed_dim
        cond["pooled"] = torch.randn(b, pooled)
    return {"latent_mean": torch.randn(2 * b, 4, h, h), "latent_std": torch.full((2 * b, 4, h, h), 0.01),
            "cond": cond, "original_sizes": torch.full((2 * b, 2), resolution, dtype=torch.long),
            "crops": torch.zeros(2 * b, 2, dtype=torch.long), "indices": torch.arange(b)}


def case_overrides(method: str, ckpt: bool, variant: str, resolution: int, args: argparse.Namespace) -> list[str]:
    overrides = ["model.pretrained=fake", "data.path=fake", f"train.batch_size={args.batch}", "lora.rank=8",
                 "train.mixed_precision=bf16", f"train.gradient_checkpointing={str(ckpt).lower()}",
                 f"method.name={method}", f"data.resolution={resolution}"]
    if variant.startswith("full"):
        overrides.append("lora.enabled=false")
    if variant.endswith("precomputed"):
        overrides.append("method.reference=precomputed")
    if method == "alignprop":
        reward = {"name": "aesthetic", "mlp_checkpoint": None, "model_config": CLIP_TINY if args.tiny else CLIP_L14}
        overrides += [f"method.reward={json.dumps(reward)}", f"method.num_steps={args.alignprop_steps}"]
    return overrides


def estimate(family: str, method: str, ckpt: bool, args: argparse.Namespace, variant: str = "") -> dict:
    """One case; ``variant`` "full" is full fine-tuning (fp32 master weights, a frozen bf16 reference copy for DPO)
    and "full-precomputed" the same with precomputed reference errors (no frozen copy)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from diffalign.config import load_config
    from diffalign.trainer import build_optimizer, make_trainable

    resolution = args.tiny_resolution if args.tiny else (1024 if family == "sdxl" else 512)
    cfg = load_config(None, case_overrides(method, ckpt, variant, resolution, args))
    seeds = torch.arange(args.batch)          # real, made outside the fake mode: the pairs' draws read them
    started = time.perf_counter()
    with fake_friendly(), FakeTensorMode(allow_non_fake_inputs=True):
        model = build_model(family, args.tiny, encoders=method == "alignprop")
        params = make_trainable(model, cfg, cfg.method.needs_reference)
        optimizer = build_optimizer(cfg, params)
        if method == "alignprop":
            cfg.method.reward_fn.module.to(torch.float32)         # built (fake) now, so its weights are counted
        batch = batch_for(family, method, resolution, args.batch, model)
        if method != "alignprop":
            batch["seeds"] = seeds
        if variant.endswith("precomputed"):
            batch["ref_errors"] = torch.rand(args.batch, 2)
        counter = LiveBytes()
        held = [*model.modules(), *([model.ref_denoiser] if model.ref_denoiser is not None else []),
                *([cfg.method.reward_fn.module] if method == "alignprop" else [])]     # the frozen copy too
        for module in held:
            for t in [*module.parameters(), *module.buffers()]:
                counter.add(t)
        for v in tree_flatten(batch)[0]:
            if isinstance(v, torch.Tensor):
                counter.add(v)
        weights = counter.current
        flops = None
        with counter:
            for _ in range(2):
                train_step(cfg, model, batch, params, optimizer)
        if args.flops:   # a third step, outside the counter: FlopCounterMode keeps checkpointed activations alive
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as fc:
                train_step(cfg, model, batch, params, optimizer)
            flops = fc.get_total_flops()
        lora = sum(p.numel() * p.element_size() for p in params)
        state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                    if isinstance(t, torch.Tensor) and t.ndim > 0)
    return {"case": f"{family}-{method}{'-ckpt' if ckpt else ''}{'-' + variant if variant else ''}",
            "resolution": resolution,
            "peak_gib": counter.peak / GiB, "weights_gib": weights / GiB, "lora_grads_gib": lora / GiB,
            "adam_gib": state / GiB, "rest_gib": (counter.peak - weights - lora - state) / GiB,
            "tflop_step": flops / 1e12 if flops else None, "seconds": time.perf_counter() - started}


def train_step(cfg: Any, model: Any, batch: dict, params: list, optimizer: Any) -> None:
    """Trainer.train_step's work for one micro-batch (no accelerate: a CPU autocast in its place)."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = cfg.method.loss(model, batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


CASES = [(fam, method, ckpt, "") for fam in ("sdxl", "sd15") for method in ("dpo", "mapo", "alignprop")
         for ckpt in (True, False)]
CASES += [(fam, "dpo", True, variant) for fam in ("sdxl", "sd15") for variant in ("full", "full-precomputed")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="", help="comma-separated names, e.g. sdxl-dpo-ckpt,sd15-mapo")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--alignprop-steps", type=int, default=2)
    parser.add_argument("--flops", action="store_true", help="also count the FLOPs of a third step")
    parser.add_argument("--tiny", action="store_true", help="tiny models (a quick self-check)")
    parser.add_argument("--tiny-resolution", type=int, default=64)
    args = parser.parse_args()
    names = [f"{f}-{m}{'-ckpt' if c else ''}{'-' + v if v else ''}" for f, m, c, v in CASES]
    chosen = args.cases.split(",") if args.cases else names
    unknown = set(chosen) - set(names)
    if unknown:
        sys.exit(f"unknown cases {sorted(unknown)}; choose from {', '.join(names)}")
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}; fake tensors on the CPU device; batch {args.batch} pair(s)/prompt(s), "
          f"LoRA rank 8, bf16 autocast, AdamW; GiB = 2^30 bytes")
    print("| case | px | predicted peak GiB | weights | grads (LoRA, or all in full FT) | AdamW state | "
          "activations + temps | TFLOP/step | s |\n|---|---|---|---|---|---|---|---|---|", flush=True)
    for (fam, method, ckpt, variant), name in zip(CASES, names, strict=True):
        if name not in chosen:
            continue
        try:
            r = estimate(fam, method, ckpt, args, variant)
        except Exception as err:  # noqa: BLE001 (a failing case is a row, the others still run)
            print(f"| {name} | - | failed: {type(err).__name__}: {str(err).splitlines()[0][:150]} |", flush=True)
            continue
        tf = f"{r['tflop_step']:.1f}" if r["tflop_step"] else "-"
        print(f"| {r['case']} | {r['resolution']} | {r['peak_gib']:.2f} | {r['weights_gib']:.2f} | "
              f"{r['lora_grads_gib']:.3f} | {r['adam_gib']:.3f} | {r['rest_gib']:.2f} | {tf} | {r['seconds']:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
