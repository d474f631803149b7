"""Predicted peak GPU memory of diffalign training steps, without a GPU: the step runs on fake tensors.

    python scripts/estimate_gpu_memory.py                       # SDXL 1024 px and SD 1.5 512 px, DPO/MaPO/AlignProp
    python scripts/estimate_gpu_memory.py --cases sdxl-dpo-ckpt --flops
    python scripts/estimate_gpu_memory.py --cases sdxl-dpo-ckpt-full,sdxl-dpo-ckpt-full-precomputed   # full FT
    python scripts/estimate_gpu_memory.py --cases sdxl-dpo-ckpt-full --fsdp2 2,4,8    # per GPU, sharded over N
    python scripts/estimate_gpu_memory.py --cases flux-dpo-ckpt,sd35m-dpo-ckpt       # FLUX.1-dev, SD3.5 Medium

Every case builds the real-size UNet (and, where the step needs them, the VAE, both text encoders and the reward's
CLIP ViT-L/14), or the real-size SD3.5 Medium or FLUX.1-dev transformer (``models/full_size.FLOW_TRANSFORMERS``;
their pair methods read the cache, so their encoders are not built), inside ``torch._subclasses.FakeTensorMode``,
so no weight is allocated and no kernel runs, then does what ``Trainer.train_step`` does, with diffalign's own
code: ``make_trainable`` (LoRA rank 8 in fp32, gradient checkpointing when asked), ``build_optimizer`` (AdamW),
bf16 autocast around the method's ``loss(model, batch)``, backward, gradient clipping, optimizer step, zero_grad;
two steps, so the second holds the AdamW state. A
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
- ``--fsdp2 N``: the denoiser is sharded as accelerate's FSDP2 preparation shards it (``fully_shard`` on each
  ``_no_split_modules`` block, bottom-up, then the root; bf16 parameters and reductions, as accelerate sets for
  ``mixed_precision: bf16``), over a fake process group of N ranks (``torch.testing``'s FakeStore): the collectives
  run on fake tensors, and the count is one rank's, its shards plus the blocks it gathers. The frozen reference
  copy is not sharded (the trainer keeps it whole on every GPU).
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
    """Counts the bytes of live tensor storages (each storage once) and keeps the peak. A storage resized in place
    (FSDP2 frees and re-allocates its gathered parameters so) is followed through :meth:`resized`."""

    def __init__(self) -> None:
        super().__init__()
        self.current = self.peak = 0
        self.seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # storage -> [bytes counted]

    def add(self, t: torch.Tensor) -> None:
        local = getattr(t, "_local_tensor", None)            # a DTensor (FSDP2 shard): this rank's piece
        if local is not None:
            t = local
        st = t.untyped_storage()
        if st in self.seen:
            return
        counted = [st.nbytes()]
        self.seen[st] = counted
        weakref.finalize(st, self._free, counted)
        self.current += counted[0]
        self.peak = max(self.peak, self.current)

    def resized(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        counted = self.seen.get(st)
        if counted is None:
            return self.add(t)
        self.current += st.nbytes() - counted[0]
        counted[0] = st.nbytes()
        self.peak = max(self.peak, self.current)

    def _free(self, counted: list[int]) -> None:
        self.current -= counted[0]

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


FLOW = ("sd35m", "flux")                   # the flow-matching families' real-size cases (pair methods, cached)
RESOLUTION = {"sdxl": 1024, "sd15": 512, "sd35m": 1024, "flux": 1024}


def build_flow_model(family: str, tiny: bool) -> Any:
    """SD3.5 Medium or FLUX.1-dev with a bf16 transformer and no encoders (cached latents and prompts); the VAE
    only gives its latent factor and channels. The schedule's tables (and the tiny self-check's transformer) are
    host-side and real: made outside the fake mode."""
    import diffusers
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from diffalign.models import FluxModel, SD3Model
    from diffalign.models.full_size import FLOW_TRANSFORMERS, flow_scheduler
    from diffalign.models.schedules import FlowSchedule
    from diffalign.models.tiny import _flow_vae, _flux_pipeline, _sd3_pipeline

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with unset_fake_temporarily():
            schedule = FlowSchedule(dict(flow_scheduler(family).config))
            if tiny:
                transformer = (_sd3_pipeline() if family == "sd35m" else _flux_pipeline()).transformer
        if not tiny:
            name, config = FLOW_TRANSFORMERS[family]
            transformer = getattr(diffusers, name)(**config)
    finally:
        torch.set_default_dtype(default)
    for buffer in transformer.buffers():     # SD3's fp32 position table: bf16, as from_pretrained(torch_dtype) casts it
        buffer.data = buffer.data.to(torch.bfloat16) if buffer.is_floating_point() else buffer.data
    cls = SD3Model if family == "sd35m" else FluxModel
    return cls(transformer, _flow_vae(1.0, 0.0), [], [], schedule)


def build_model(family: str, tiny: bool, encoders: bool) -> Any:
    """The family's DiffusionModel with a bf16 UNet (and bf16 text encoders + fp32 VAE when ``encoders``), or a
    flow family's with a bf16 transformer."""
    if family in FLOW:
        model = build_flow_model(family, tiny)
        for module in model.modules():
            module.requires_grad_(False).eval()
        return model
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
    config = model.denoiser.config
    if family in FLOW:      # T5 tokens at the pipelines' defaults: SD3 77 CLIP + 256, FLUX.1-dev 512
        tokens = 77 + model.max_sequence_length if family == "sd35m" else model.max_sequence_length
        cond = {"hidden": torch.randn(b, tokens, config.joint_attention_dim),
                "pooled": torch.randn(b, config.pooled_projection_dim)}
    else:
        cond = {"hidden": torch.randn(b, 77, config.cross_attention_dim)}
    if family == "sdxl":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        cond["pooled"] = torch.randn(b, pooled)
    c = model.vae.config.latent_channels
    return {"latent_mean": torch.randn(2 * b, c, h, h), "latent_std": torch.full((2 * b, c, h, h), 0.01),
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


def fake_mesh(ranks: int) -> Any:
    """A device mesh over a fake process group of ``ranks`` ranks (made outside the fake mode; replaces any
    earlier one)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=ranks)
    return init_device_mesh("cpu", (ranks,))


def shard_like_accelerate(denoiser: torch.nn.Module, mesh: Any) -> None:
    """accelerate's FSDP2 preparation (transformer_based_wrap, bf16): each ``_no_split_modules`` block bottom-up,
    then the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16,
                                  output_dtype=torch.bfloat16)
    blocks = set(denoiser._no_split_modules)
    for module in reversed(list(denoiser.modules())):
        if module is not denoiser and type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh, mp_policy=policy)
    fully_shard(denoiser, mesh=mesh, mp_policy=policy)


def resident(model: Any, cfg: Any, method: str, batch: dict) -> LiveBytes:
    """A counter holding what is resident before the step: every module's weights and buffers (the frozen copy and
    the reward model too) and the batch."""
    counter = LiveBytes()
    held = [*model.modules(), *([model.ref_denoiser] if model.ref_denoiser is not None else []),
            *([cfg.method.reward_fn.module] if method == "alignprop" else [])]
    for module in held:
        for t in [*module.parameters(), *module.buffers()]:
            counter.add(t)
    for v in tree_flatten(batch)[0]:
        if isinstance(v, torch.Tensor):
            counter.add(v)
    return counter


@contextlib.contextmanager
def following_fsdp2_storage(counter: LiveBytes):
    """FSDP2 gathers a block's parameters into storages it resizes in place (``alloc_storage`` / ``free_storage``,
    torch internals), which no operator shows: report each resize to ``counter``."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param, _fsdp_param_group

    alloc, free = _fsdp_param.alloc_storage, _fsdp_param.free_storage

    def followed(fn: Any) -> Any:
        def call(tensor: torch.Tensor) -> None:
            fn(tensor)
            counter.resized(tensor)
        return call

    _fsdp_param.alloc_storage = _fsdp_param_group.alloc_storage = followed(alloc)
    _fsdp_param.free_storage = followed(free)
    try:
        yield
    finally:
        _fsdp_param.alloc_storage = _fsdp_param_group.alloc_storage = alloc
        _fsdp_param.free_storage = free


def _nbytes(t: torch.Tensor) -> int:
    t = getattr(t, "_local_tensor", t)
    return t.numel() * t.element_size()


def estimate(family: str, method: str, ckpt: bool, args: argparse.Namespace, variant: str = "",
             shards: int = 1) -> dict:
    """One case; ``variant`` "full" is full fine-tuning (fp32 master weights, a frozen bf16 reference copy for DPO)
    and "full-precomputed" the same with precomputed reference errors (no frozen copy); ``shards`` > 1 shards
    the denoiser with FSDP2 over that many (fake) ranks."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from diffalign.config import load_config
    from diffalign.trainer import build_optimizer, make_trainable

    resolution = args.tiny_resolution if args.tiny else RESOLUTION[family]
    cfg = load_config(None, case_overrides(method, ckpt, variant, resolution, args))
    seeds = torch.arange(args.batch)          # real, made outside the fake mode: the pairs' draws read them
    started = time.perf_counter()
    mesh = fake_mesh(shards) if shards > 1 else None
    with fake_friendly(), FakeTensorMode(allow_non_fake_inputs=True):
        model = build_model(family, args.tiny, encoders=method == "alignprop")
        params = make_trainable(model, cfg, cfg.method.needs_reference)
        if mesh is not None:
            shard_like_accelerate(model.denoiser, mesh)
            params = [p for p in model.denoiser.parameters() if p.requires_grad]     # the sharded ones
        optimizer = build_optimizer(cfg, params)
        if method == "alignprop":
            cfg.method.reward_fn.module.to(torch.float32)         # built (fake) now, so its weights are counted
        batch = batch_for(family, method, resolution, args.batch, model)
        if method != "alignprop":
            batch["seeds"] = seeds
        if variant.endswith("precomputed"):
            batch["ref_errors"] = torch.rand(args.batch, 2)
        counter = resident(model, cfg, method, batch)
        weights = counter.current
        flops = None
        with counter, following_fsdp2_storage(counter) if mesh is not None else contextlib.nullcontext():
            for _ in range(2):
                train_step(cfg, model, batch, params, optimizer)
        if args.flops:   # a third step, outside the counter: FlopCounterMode keeps checkpointed activations alive
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as fc:
                train_step(cfg, model, batch, params, optimizer)
            flops = fc.get_total_flops()
        lora = sum(_nbytes(p) for p in params)
        state = sum(_nbytes(t) for s in optimizer.state.values() for t in s.values()
                    if isinstance(t, torch.Tensor) and t.ndim > 0)
    name = f"{family}-{method}{'-ckpt' if ckpt else ''}{'-' + variant if variant else ''}"
    return {"case": name + (f" (FSDP2, per GPU of {shards})" if shards > 1 else ""),
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
CASES += [(fam, method, ckpt, "") for fam in FLOW for method, ckpt in (("dpo", True), ("dpo", False), ("mapo", True))]
CASES += [(fam, "dpo", True, variant) for fam in FLOW for variant in ("full", "full-precomputed")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="", help="comma-separated names, e.g. sdxl-dpo-ckpt,sd15-mapo")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--alignprop-steps", type=int, default=2)
    parser.add_argument("--flops", action="store_true", help="also count the FLOPs of a third step")
    parser.add_argument("--tiny", action="store_true", help="tiny models (a quick self-check)")
    parser.add_argument("--tiny-resolution", type=int, default=64)
    parser.add_argument("--fsdp2", default="", help="comma-separated process counts: each case sharded with FSDP2 "
                                                   "over that many GPUs, per GPU (e.g. 2,4,8)")
    args = parser.parse_args()
    shard_counts = [int(n) for n in args.fsdp2.split(",")] if args.fsdp2 else [1]
    if args.fsdp2 and min(shard_counts) < 2:
        sys.exit("--fsdp2 takes process counts of 2 or more")
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
    runs = [(case, name, n) for case, name in zip(CASES, names, strict=True) if name in chosen
            for n in shard_counts]
    for (fam, method, ckpt, variant), name, shards in runs:
        try:
            r = estimate(fam, method, ckpt, args, variant, shards)
        except Exception as err:  # noqa: BLE001 (a failing case is a row, the others still run)
            print(f"| {name} | - | failed: {type(err).__name__}: {str(err).splitlines()[0][:150]} |", flush=True)
            continue
        tf = f"{r['tflop_step']:.1f}" if r["tflop_step"] else "-"
        print(f"| {r['case']} | {r['resolution']} | {r['peak_gib']:.2f} | {r['weights_gib']:.2f} | "
              f"{r['lora_grads_gib']:.3f} | {r['adam_gib']:.3f} | {r['rest_gib']:.2f} | {tf} | {r['seconds']:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
