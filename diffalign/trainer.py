"""The one training loop. The only module that touches accelerate, optimizers, checkpoints and trackers.

A method supplies ``loss(model, batch) -> (loss, metrics)``; everything else (LoRA or full fine-tuning,
mixed precision, accumulation, clipping, the NaN guard, checkpoints and exact resume) lives here.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from diffalign import checkpoint as ckpt
from diffalign import runs, sharded, zero
from diffalign.config import Config, ConfigError, dump_config, to_dict
from diffalign.data import open_training_data
from diffalign.data.pairs import DataError
from diffalign.data.sampler import EpochBatches, example_seeds
from diffalign.models import load_model
from diffalign.models.base import DiffusionModel, to_float32, unwrap
from diffalign.models.lora import add_lora, load_lora, lora_module_state, save_lora
from diffalign.options import parse_dtype

log = logging.getLogger("diffalign")


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient: training stopped before the bad update was applied."""


def build_optimizer(cfg: Config, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA unless train.fused_adamw says otherwise) or Adafactor. Under DeepSpeed's optimizer
    offload, accelerate turns torch's AdamW into DeepSpeed's CPU Adam in AdamW mode; any other class would become
    Adam with L2 decay there, so this stays torch's."""
    t = cfg.train
    if t.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=t.lr, weight_decay=t.weight_decay, scale_parameter=False,
                         relative_step=False, warmup_init=False)
    fused = t.fused_adamw if t.fused_adamw is not None else (
        bool(params) and all(p.device.type == "cuda" for p in params))
    return torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps,
                             weight_decay=t.weight_decay, fused=fused or None)


def make_trainable(model: DiffusionModel, cfg: Config, needs_reference: bool) -> list[torch.nn.Parameter]:
    """LoRA adapters (reference = adapters disabled) or the whole denoiser (reference = a frozen copy). An unset
    ``lora.target_modules`` becomes the family's ``lora_targets`` in ``cfg``, so the run's config records them."""
    if cfg.lora.enabled:
        if cfg.lora.target_modules is None:
            cfg.lora.target_modules = list(model.lora_targets)
        params = add_lora(model.denoiser, cfg.lora)
    else:
        if needs_reference:
            model.ref_denoiser = copy.deepcopy(model.denoiser).requires_grad_(False).eval()
        to_float32(model.denoiser).requires_grad_(True)
        params = list(model.denoiser.parameters())
    if cfg.train.gradient_checkpointing:
        model.denoiser.enable_gradient_checkpointing()
    model.denoiser.train()
    return params


def lasting(batch: dict) -> dict:
    """A prepared batch without its transient ("_") entries, on the CPU: what a checkpoint keeps."""
    from accelerate.utils import send_to_device

    return send_to_device({k: v for k, v in batch.items() if not k.startswith("_")}, "cpu")


def flat_hparams(cfg: Config) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                out[prefix + key] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk(to_dict(cfg), "")
    return out


def _launched_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _cpu_only() -> bool:
    """Several launched processes and no GPU: ask accelerate for gloo on CPU (it otherwise runs each alone)."""
    return _launched_world() > 1 and not torch.cuda.is_available()


def _check_world(num_processes: int) -> None:
    """Refuse to train unsynchronised copies: launched processes must form one process group."""
    if _launched_world() != num_processes:
        raise RuntimeError(f"{_launched_world()} processes were launched but accelerate sees {num_processes}; "
                           "their gradients would not be synchronised. Launch with `accelerate launch --multi_gpu "
                           "--num_processes N` or `torchrun --nproc_per_node N`.")


def _check_resolution(cfg: Config, factor: int) -> None:
    for key, value in (("data.resolution", cfg.data.resolution), ("eval.resolution", cfg.eval.resolution)):
        if value is not None and value % factor:
            raise ConfigError(f"`{key}` = {value} is not a multiple of the VAE's latent factor {factor} "
                              f"(e.g. {max(factor, value // factor * factor)})")


def _worker_count(requested: int) -> int:
    """data.num_workers, clamped (with one warning) to the CPU cores this process may use."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if requested > cores:
        log.warning("data.num_workers = %d exceeds the %d CPU cores available; using %d", requested, cores, cores)
        return cores
    return requested


def keep_models_whole() -> None:
    """Under ZeRO-3, accelerate registers DeepSpeed's config with transformers, whose ``from_pretrained`` then
    partitions every model it loads (``zero.Init``): the frozen text encoders and reward models too, which DeepSpeed
    never manages, so they break. Only the denoiser is partitioned, by DeepSpeed itself when it is prepared."""
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def divergence_advice(out: Path, step: int) -> str:
    """Which checkpoint to go back to after step ``step`` diverged: not the one whose weights produced it."""
    found = ckpt.checkpoints(out)
    if not found:
        return "No checkpoint was written."
    steps = {p: int(p.name.split("-")[1]) for p in found}
    good = [p for p in found if steps[p] <= step - 2 and ckpt.read_state(p).get("weights_finite", True)]
    last, text = found[-1], ""
    if steps[last] == step - 1:
        text = (f"Last checkpoint: {last.name}, which holds the weights this step started from (resuming it "
                "repeats the divergence unless a setting such as train.lr changes). ")
    elif last not in good:
        text = f"Last checkpoint: {last.name}, whose weights are not finite. "
    return text + (f"Last good checkpoint: {good[-1].name}." if good else "No earlier good checkpoint.")


class Trainer:
    def __init__(self, cfg: Config) -> None:
        from datetime import timedelta

        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs, set_seed

        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        t = cfg.train
        self.acc = Accelerator(mixed_precision=t.mixed_precision, project_dir=str(self.out), cpu=_cpu_only(),
                               log_with=None if t.report_to == "none" else t.report_to,
                               kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=t.process_timeout_s))])
        _check_world(self.acc.num_processes)
        keep_models_whole()          # accelerate registers DeepSpeed's config once, when the Accelerator is made
        set_seed(t.seed, device_specific=True)
        self.method = cfg.method
        runs.check_output_dir(self.out)
        self.model = load_model(cfg.model, self.acc.device, parse_dtype(t.mixed_precision))
        _check_resolution(cfg, self.model.latent_factor)
        try:
            self.model.schedule.use_timestep_sampling(t.timestep_sampling)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.params = make_trainable(self.model, cfg, self.method.needs_reference)
        if cfg.lora.init_from:
            if not cfg.lora.enabled:
                raise ConfigError("lora.init_from starts LoRA adapters; it needs lora.enabled=true")
            load_lora(self.model, cfg.lora.init_from)
            log.info("LoRA adapters start from %s", cfg.lora.init_from)
        self.build_missing_cache()
        self.data = open_training_data(cfg, self.model)
        if cfg.data.offload_encoders:
            if not cfg.data.cache_dir or self.method.data != "pairs":
                raise ConfigError("data.offload_encoders needs a latent cache (data.cache_dir) and a pair method: "
                                  "otherwise every step encodes images and prompts")
            self.model.offload_encoders()
        self.check_reference_epochs()
        if hasattr(self.data, "repeat_to"):          # a short prompt list still fills a global batch
            self.data.repeat_to(t.batch_size * self.acc.num_processes)
        if self.acc.num_processes > 1 and cfg.lora.enabled and not cfg.lora.init_from:
            self.broadcast_trainable()   # a fully fine-tuned or loaded denoiser is the same file on every process
        self.optimizer = build_optimizer(cfg, self.params)
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler(t.lr_scheduler, self.optimizer, num_warmup_steps=t.warmup_steps,
                                          num_training_steps=t.max_steps)
        self.prepare_engine()
        self.step = 0
        self.micro_batches = 0        # micro-batches this process has drawn, whole skipped ones included
        self.held: list[dict] = []    # prepared micro-batches kept for the method's next updates
        self.pending: tuple[torch.Tensor, int] | None = None   # the last step's non-finite flag, not yet read
        if self.acc.num_processes > 1:
            self.method.gather = self.acc.gather
        self.skipped = {"epoch": -1, "pairs": 0, "run": 0}
        self.progress_grid = None
        if cfg.eval.every and (self.acc.is_main_process or self.everyone_samples):
            from diffalign.eval.monitor import ProgressGrid

            self.progress_grid = ProgressGrid(cfg, self.model, write=self.acc.is_main_process)

    def broadcast_trainable(self) -> None:
        """Every process starts from the main process's LoRA init (random, seeded per device). DDP would copy it at
        wrapping; FSDP2 keeps each process's own slice, so do it here."""
        from accelerate.utils import broadcast

        with torch.no_grad():
            for p in self.params:
                p.copy_(broadcast(p.detach().clone()))

    def prepare_engine(self) -> None:
        """Set the denoiser's layout and compilation when asked, then wrap it and the optimizer for the launch
        (DDP, FSDP2 or a DeepSpeed engine) and record which."""
        self.tune_denoiser()
        deepspeed = self.configure_deepspeed()
        self.model.denoiser, self.optimizer = self.acc.prepare(self.model.denoiser, self.optimizer)
        self.zero_stage = zero.stage(self.model.denoiser) if deepspeed else 0
        if deepspeed and not self.zero_stage:
            raise ConfigError("DeepSpeed without ZeRO (zero_stage 0) is plain data parallelism: use "
                              "configs/accelerate/multi_gpu.yaml, or set zero_stage 1, 2 or 3")
        self.sharded = self.check_sharding()
        self.engine = ("fsdp2" if self.sharded else f"deepspeed-zero{self.zero_stage}" if self.zero_stage
                       else "ddp")
        self.params = [p for p in self.model.denoiser.parameters() if p.requires_grad]   # FSDP2 made new ones

    def tune_denoiser(self) -> None:
        """train.channels_last (convolution weights stored NHWC, so the activations follow) and train.compile
        (regional torch.compile of the repeated blocks), before the engine wraps the denoiser, in torchtitan's
        order: FSDP2's hooks then stay outside the compiled blocks (dynamo skips them). Refused: channels_last
        under FSDP2 and DeepSpeed, which both fail on non-contiguous parameters, and compile under ZeRO-3, whose
        per-module parameter fetch breaks the compiled graphs (176 graph breaks in 3 steps of the tiny UNet;
        none under FSDP2 or ZeRO-2)."""
        from accelerate.utils import DistributedType

        t, kind = self.cfg.train, self.acc.distributed_type
        if t.channels_last and kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise ConfigError(f"train.channels_last is supported with one process or DDP, not with {kind.value} "
                              "(it fails on non-contiguous parameters): set it to false")
        if t.compile and kind == DistributedType.DEEPSPEED and str(   # the stage asked for: no engine yet
                self.acc.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage")) == "3":
            raise ConfigError("train.compile is not supported with DeepSpeed ZeRO-3 (its parameter fetch hooks "
                              "break the compiled graphs): set it to false, or use FSDP2 or ZeRO-2")
        if t.channels_last:
            for network in (self.model.denoiser, self.model.ref_denoiser):
                if network is not None:
                    network.to(memory_format=torch.channels_last)
        if t.compile:
            count = self.model.compile_blocks(**t.compile_options)
            log.info("torch.compile of %d denoiser blocks (%s); the first steps compile", count,
                     ", ".join(f"{k}={v}" for k, v in t.compile_options.items()) or "default options")

    def check_sharding(self) -> bool:
        """Whether the denoiser is sharded over the processes by FSDP2. FSDP1 (flat parameters) is refused before
        any step is taken."""
        from accelerate.utils import DistributedType

        if self.acc.distributed_type == DistributedType.FSDP and not self.acc.is_fsdp2:
            raise ConfigError("FSDP version 1 is not supported: set `fsdp_version: 2` in the accelerate config "
                              "(configs/accelerate/fsdp2.yaml)")
        return sharded.is_sharded(self.model.denoiser)

    def configure_deepspeed(self) -> bool:
        """Whether the run is under DeepSpeed; if so, the engine is set to leave accumulation to the trainer.

        DeepSpeed's own accumulation counts backward calls, but a method may make several per micro-batch (GRPO's
        timesteps, MaPO's parts). With ``managed_gradient_accumulation=false`` a backward only accumulates and
        ``engine.step()`` reduces, clips to ``gradient_clipping``, skips a non-finite norm and updates: the same
        step as the other engines. Values the accelerate config sets that would contradict ours are refused."""
        from accelerate.utils import DistributedType

        if self.acc.distributed_type != DistributedType.DEEPSPEED:
            return False
        t, ds = self.cfg.train, self.acc.state.deepspeed_plugin.deepspeed_config
        if t.mixed_precision == "fp16":
            raise ConfigError("DeepSpeed with train.mixed_precision=fp16 is not supported (its loss scaler skips "
                              "overflowing steps, which the trainer would take for divergence): use bf16")
        if t.optimizer != "adamw":
            raise ConfigError(f"DeepSpeed runs with train.optimizer=adamw only (got {t.optimizer!r})")
        ours = {"train_micro_batch_size_per_gpu": t.batch_size, "gradient_accumulation_steps": 1,
                "train_batch_size": t.batch_size * self.acc.num_processes,
                "gradient_clipping": float(t.max_grad_norm) if t.max_grad_norm is not None else 0.0}
        setting = {"train_micro_batch_size_per_gpu": "train.batch_size", "gradient_accumulation_steps":
                   "train.grad_accum (the accelerate config's must be 1)", "train_batch_size": "train.batch_size",
                   "gradient_clipping": "train.max_grad_norm"}
        for key, value in ours.items():
            given = ds.get(key, "auto")
            if given not in ("auto", None) and float(given) != float(value):
                raise ConfigError(f"the DeepSpeed config sets {key}={given}, but the run needs {value}: "
                                  f"set it with {setting[key]} instead (or leave it 'auto')")
        ds.update(ours, managed_gradient_accumulation=False)
        return True

    @property
    def everyone_samples(self) -> bool:
        """In-training evaluation runs on every process when the weights are partitioned (FSDP2, ZeRO-3)."""
        return self.sharded or self.zero_stage == 3

    # ------------------------------------------------------------------------------ data
    def build_missing_cache(self) -> None:
        """data.cache_dir set but not built yet: build it now with the encoders already loaded, in this process
        (every launched process writes its shards, as `diffalign cache` does), instead of a second process start.
        A cache that exists but is stale is still refused with its differences: nothing is deleted here."""
        cache = self.cfg.data.cache_dir
        if not cache or self.method.data != "pairs" or (Path(cache) / "manifest.json").is_file():
            return
        from diffalign.data.cache import build_cache

        log.info("data.cache_dir=%s has no cache yet: building it before training", cache)
        build_cache(self.cfg, self.model)
        self.acc.wait_for_everyone()

    def check_reference_epochs(self) -> None:
        """Precomputed reference errors must cover every epoch the run will reach (said now, not at that epoch)."""
        have = getattr(self.data, "reference_epochs", None)
        if have is None:
            return
        t = self.cfg.train
        per_epoch = max(EpochBatches.per_epoch(len(self.data), t.batch_size, self.acc.num_processes), 1)
        need = math.ceil(t.max_steps * t.grad_accum / per_epoch)
        if need > have:
            raise ConfigError(f"{self.cfg.data.cache_dir}: reference errors cover {have} epochs; train.max_steps = "
                              f"{t.max_steps} reaches {need}. Rebuild them: `diffalign cache CONFIG "
                              f"data.reference_epochs={need}`")

    def batches(self) -> Iterator[dict]:
        """Micro-batches from the current position on; the position is the count of micro-batches drawn."""
        t, acc = self.cfg.train, self.acc
        per_epoch = EpochBatches.per_epoch(len(self.data), t.batch_size, acc.num_processes)
        if per_epoch == 0:
            raise DataError(f"{self.cfg.data.path}: {len(self.data)} examples are fewer than one global batch "
                            f"({t.batch_size} x {acc.num_processes} processes)")
        epoch, start = divmod(self.micro_batches, per_epoch)
        workers = _worker_count(self.cfg.data.num_workers)
        while True:
            self.data.set_epoch(epoch)
            order = EpochBatches(len(self.data), t.batch_size, t.seed, epoch, start, acc.process_index,
                                 acc.num_processes, order=getattr(self.data, "epoch_order", None))
            loader = torch.utils.data.DataLoader(
                self.data, batch_sampler=order, collate_fn=self.data.collate, num_workers=workers,
                generator=torch.Generator().manual_seed(t.seed), persistent_workers=False,
                pin_memory=self.acc.device.type == "cuda")          # page-locked batches copy faster to a GPU
            for drawn, batch in zip(iter(order), loader, strict=True):     # the same index lists, in order
                self.micro_batches += 1
                self.count_skipped(batch, epoch, per_epoch * t.batch_size)
                kept = drawn if len(drawn) == batch["indices"].numel() else batch["indices"].tolist()  # skip_pair
                batch["seeds"] = example_seeds(t.seed, epoch, len(self.data), kept)
                batch["batch_seed"] = t.seed * 1_000_003 + self.micro_batches   # the same on every process
                yield batch
            epoch, start = epoch + 1, 0

    def count_skipped(self, batch: dict, epoch: int, epoch_pairs: int) -> None:
        """Count unreadable pairs (data.on_bad_image=skip_pair); stop once an epoch's share passes the limit."""
        if self.skipped["epoch"] != epoch:
            self.skipped.update(epoch=epoch, pairs=0)
        n = int(batch.get("num_skipped", 0))
        self.skipped["pairs"] += n
        self.skipped["run"] += n
        limit = self.cfg.data.max_skip_fraction
        if n and self.skipped["pairs"] > limit * epoch_pairs:
            raise DataError(f"{self.cfg.data.path}: {self.skipped['pairs']} of the {epoch_pairs} pairs this process "
                            f"reads in epoch {epoch} are unreadable, more than data.max_skip_fraction = {limit:g}; "
                            "the warnings above name them. Fix or remove those rows, or raise the limit.")

    def next_batch(self, batches: Iterator[dict]) -> dict:
        """The next readable micro-batch, prepared by the method (GRPO: its rollouts) without gradient."""
        batch = next(batches)
        while batch["indices"].numel() == 0:     # every pair of the batch was unreadable (skip_pair)
            batch = next(batches)                # counted in the position, so a resume skips it too
        with torch.no_grad(), self.acc.autocast():
            return self.method.prepare(self.model, batch)

    def loss_parts(self, batch: dict) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """The method's loss terms, each computed under autocast; the caller backpropagates one before the next."""
        parts = self.method.loss_parts(self.model, batch)
        while True:
            with self.acc.autocast():
                part = next(parts, None)
            if part is None:
                return
            yield part

    # ------------------------------------------------------------------------------ one optimizer step
    def micro_batches_of_step(self, batches: Iterator[dict]) -> list[dict]:
        """This step's micro-batches: every minibatch of a cycle is prepared (sampled) before its first update."""
        t, minibatches = self.cfg.train, self.method.minibatches
        held = t.grad_accum * minibatches
        if self.step % self.cycle == 0 or len(self.held) != held:
            self.held = []                       # new batches for this cycle of steps
        while len(self.held) < held:
            self.held.append(self.next_batch(batches))
        first = (self.step % minibatches) * t.grad_accum
        return self.held[first:first + t.grad_accum]

    def train_step(self, batches: Iterator[dict]) -> dict[str, torch.Tensor]:
        if self.zero_stage:
            return self.deepspeed_step(batches)
        t, acc = self.cfg.train, self.acc
        sums: dict[str, torch.Tensor] = {}
        own_sync = self.method.many_grad_calls and not self.sharded   # FSDP2 reduces per backward, any calls
        for i, batch in enumerate(self.micro_batches_of_step(batches)):
            last = i == t.grad_accum - 1 and not own_sync
            with contextlib.nullcontext() if last else acc.no_sync(self.model.denoiser):
                for loss, metrics in self.loss_parts(batch):
                    acc.backward(loss / t.grad_accum)
                    for key, value in metrics.items():
                        sums[key] = sums.get(key, 0) + value.float() / t.grad_accum
        if own_sync:
            self.average_gradients()
        max_norm = t.max_grad_norm if t.max_grad_norm is not None else math.inf
        grad_norm = acc.clip_grad_norm_(self.params, max_norm)
        if hasattr(grad_norm, "full_tensor"):   # a DTensor under FSDP2 (the norm over every shard)
            grad_norm = grad_norm.full_tensor()
        self.resolve_pending()                  # the previous step's check: its flag is long computed by now
        bad = self.nonfinite(sums["loss"], grad_norm)
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        if self.defer_check:                    # fused AdamW skips the update on the device when bad > 0
            inner.found_inf, inner.grad_scale = (bad > 0).float(), None
            try:
                self.optimizer.step()
            finally:
                del inner.found_inf, inner.grad_scale
            self.pending = (bad, self.step + 1)
        else:
            self.pending = (bad, self.step + 1)
            self.resolve_pending()
            self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.cycle == 1:
            self.held = []
        sums["grad_norm"] = grad_norm.detach().float() if torch.is_tensor(grad_norm) else torch.tensor(grad_norm)
        return sums

    def deepspeed_step(self, batches: Iterator[dict]) -> dict[str, torch.Tensor]:
        """One optimizer step through the DeepSpeed engine (see :meth:`configure_deepspeed`): the backward calls
        accumulate, ``engine.step()`` reduces, clips and updates, and skips the update itself when the gradient
        norm is not finite; the trainer then stops as on the other engines."""
        t, engine = self.cfg.train, self.model.denoiser
        sums: dict[str, torch.Tensor] = {}
        for batch in self.micro_batches_of_step(batches):
            for loss, metrics in self.loss_parts(batch):
                engine.backward(loss / t.grad_accum, scale_wrt_gas=False)
                for key, value in metrics.items():
                    sums[key] = sums.get(key, 0) + value.float() / t.grad_accum
        engine.step()
        norm = engine.get_global_grad_norm()          # None only if DeepSpeed computed none: then the loss decides
        grad_norm = torch.as_tensor(math.nan if norm is None else norm, dtype=torch.float32).detach().cpu()
        self.resolve_pending()
        self.pending = (self.nonfinite(sums["loss"], torch.zeros(()) if norm is None else grad_norm), self.step + 1)
        self.resolve_pending()
        self.lr_scheduler.step()
        if self.cycle == 1:
            self.held = []
        sums["grad_norm"] = grad_norm
        return sums

    def average_gradients(self) -> None:
        """All-reduce gradients by hand, for methods that call the denoiser with gradient several times per backward.

        DDP's reducer expects one forward per backward (and a checkpointed denoiser re-runs its forward inside
        backward), so such methods run every micro-batch under no_sync and their gradients are averaged here.
        """
        if self.acc.num_processes == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = self.acc.reduce(torch.cat([g.flatten() for g in grads]), reduction="mean")
        for p, g in zip(self.params, flat.split([g.numel() for g in grads]), strict=True):
            p.grad = g.view_as(p).to(p.dtype)

    @property
    def cycle(self) -> int:
        """Optimizer steps on one set of prepared micro-batches: each minibatch, updates_per_batch times over."""
        return self.method.updates_per_batch * self.method.minibatches

    @property
    def defer_check(self) -> bool:
        """Fused AdamW (not under fp16's grad scaler, which sets the skip flag itself) can skip a bad step on the
        device, so its check may wait for the next step instead of stalling this one."""
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        return (isinstance(inner, torch.optim.AdamW) and bool(inner.defaults.get("fused"))
                and self.cfg.train.mixed_precision != "fp16")

    def nonfinite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """A device flag, summed over every process, > 0 when a loss or gradient norm is not finite."""
        bad = (~torch.isfinite(loss.detach().to(self.acc.device))).float()
        if self.cfg.train.mixed_precision != "fp16":   # in fp16 the grad scaler skips inf steps itself
            bad = bad + (~torch.isfinite(torch.as_tensor(grad_norm, device=self.acc.device))).float()
        return self.acc.reduce(bad, reduction="sum")

    def resolve_pending(self) -> None:
        """Stop, on every process alike, if the last step's flag says it was not finite: its update was not
        applied (skipped on the device, or never run) and nothing was written since."""
        if self.pending is None:
            return
        bad, step = self.pending
        self.pending = None
        if bad.item() > 0:
            raise TrainingDiverged(
                f"non-finite loss or gradient at step {step}; the update was not applied and nothing "
                f"was written. {divergence_advice(self.out, step)} Try a lower train.lr, "
                f"train.mixed_precision=bf16, or model.vae_dtype=float32.")

    # ------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        acc, target = self.acc, self.out / f"checkpoint-{self.step}"
        tmp = target.with_name(f".tmp-{target.name}")
        if acc.is_main_process:
            ckpt.temp_dir(target)
        acc.wait_for_everyone()
        torch.save({**ckpt.rng_state(), "micro_batches": self.micro_batches, "skipped_pairs": self.skipped["run"],
                    "method": self.method.state_dict(),
                    "held": [lasting(b) for b in self.held] if self.step % self.cycle else []},
                   tmp / f"rng_{acc.process_index}.pt")
        acc.wait_for_everyone()
        weights, optimizer = self.gathered_state(with_optimizer=True)       # sharded: every process takes part
        if acc.is_main_process:
            self._fill_checkpoint(tmp, weights, optimizer)
            ckpt.commit(tmp, target)
            ckpt.prune(self.out, self.cfg.train.keep_last)
        acc.wait_for_everyone()
        return target

    def gathered_state(self, with_optimizer: bool = False) -> tuple[dict | None, dict | None]:
        """(the denoiser's whole state dict, the optimizer's) on the main process when the denoiser is sharded:
        a collective that every process calls. (None, None) unsharded: the main process saves from its copy."""
        if self.zero_stage:
            engine = self.model.denoiser
            keep = self.acc.is_main_process                  # the others take part and keep nothing
            return (zero.full_weights(engine, trainable_only=self.cfg.lora.enabled, keep=keep),
                    zero.full_optimizer_state(engine, keep=keep) if with_optimizer else None)
        if not self.sharded:
            return None, None
        weights = sharded.full_model_state(self.model.denoiser)
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        return weights, sharded.full_optimizer_state(self.model.denoiser, inner) if with_optimizer else None

    def _fill_checkpoint(self, directory: Path, weights: dict | None, optimizer: dict | None) -> None:
        self.save_weights(directory, weights)
        torch.save(optimizer if optimizer is not None else self.optimizer.state_dict(), directory / "optimizer.pt")
        torch.save(self.lr_scheduler.state_dict(), directory / "scheduler.pt")
        tensors = list(weights.values()) if weights is not None else [p.detach() for p in self.params]
        finite = bool(torch.stack([torch.isfinite(v).all() for v in tensors if v.is_floating_point()]).all())
        ckpt.write_state(directory, {"step": self.step, "num_processes": self.acc.num_processes,
                                     "sharded": self.sharded, "engine": self.engine, "weights_finite": finite,
                                     "config": to_dict(self.cfg)})

    def save_weights(self, directory: Path, weights: dict | None = None) -> None:
        """The LoRA file or the denoiser folder; from ``weights`` (the whole state dict gathered from the
        shards) when given, else from the main process's own denoiser."""
        denoiser = unwrap(self.model.denoiser)
        if self.cfg.lora.enabled:
            save_lora(self.model, directory, weights)
        elif weights is not None:
            sharded.save_denoiser_folder(denoiser, weights, directory / self.model.denoiser_folder)
        else:
            denoiser.save_pretrained(directory / self.model.denoiser_folder, safe_serialization=True)
        dump_config(self.cfg, directory / "config.yaml")

    def resume(self) -> None:
        """Continue from the checkpoint train.resume names (verified): weights, optimizer, schedule, RNG, data."""
        self._resume_from(self.resolve_checkpoint())

    def resolve_checkpoint(self) -> Path | None:
        """The checkpoint to resume from, verified (sizes and CRCs) by the main process only and shared."""
        from accelerate.utils import broadcast_object_list

        found = [None]
        if self.acc.is_main_process:
            found = [ckpt.resolve_resume(self.out, self.cfg.train.resume)]
        if self.acc.num_processes > 1:
            broadcast_object_list(found)
        return found[0]

    def _resume_from(self, path: Path | None) -> None:
        if path is None:
            if self.cfg.train.resume:
                log.info("train.resume=%s: no checkpoint in %s, starting from step 0", self.cfg.train.resume, self.out)
            return
        state = ckpt.read_state(path)
        applied = runs.check_resume(path, {**state.get("config", {}), "num_processes": state.get("num_processes"),
                                           "sharded": state.get("sharded", False),
                                           "engine": state.get("engine", "fsdp2" if state.get("sharded") else "ddp")},
                                    {**to_dict(self.cfg), "num_processes": self.acc.num_processes,
                                     "sharded": self.sharded, "engine": self.engine})
        self.step = state["step"]
        if self.zero_stage:
            self.load_zero(path)
        elif self.sharded:
            self.load_sharded(path)
        else:
            if self.cfg.lora.enabled:
                load_lora(self.model, path)
            else:
                saved = self.model.load_denoiser(path / self.model.denoiser_folder, torch.float32)
                unwrap(self.model.denoiser).load_state_dict(saved.state_dict())
            self.optimizer.load_state_dict(ckpt.load_tensors(path / "optimizer.pt"))
        schedule_changed = any(change.split(":")[0] in runs.SCHEDULE for change in applied)
        if not schedule_changed:
            self.lr_scheduler.load_state_dict(ckpt.load_tensors(path / "scheduler.pt"))
        if applied:
            self.apply_optimizer_settings(schedule_changed)
        self.restore_process_state(path)
        log.info("resumed from %s at step %d", path, self.step)

    def load_sharded(self, path: Path) -> None:
        """The checkpoint's whole weights and optimizer state, read by the main process and scattered into the
        shards (every process calls this)."""
        main, denoiser = self.acc.is_main_process, self.model.denoiser
        if self.cfg.lora.enabled:
            weights = lora_module_state(self.model, path)[1] if main else {}
            unexpected = sharded.load_model_state(denoiser, weights, strict=False)
            if unexpected:
                raise ckpt.CheckpointError(f"{path}: {len(unexpected)} LoRA keys do not match the adapter, "
                                           f"e.g. {unexpected[:3]}")
        else:
            weights = (self.model.load_denoiser(path / self.model.denoiser_folder, torch.float32).state_dict()
                       if main else {})
            sharded.load_model_state(denoiser, weights)
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        sharded.load_optimizer_state(denoiser, inner, ckpt.load_tensors(path / "optimizer.pt") if main else {})

    def load_zero(self, path: Path) -> None:
        """The checkpoint's whole weights and optimizer state, read by every process, set into ZeRO's partitions
        and the module's copies."""
        engine, lora = self.model.denoiser, self.cfg.lora.enabled
        weights = (lora_module_state(self.model, path)[1] if lora else
                   self.model.load_denoiser(path / self.model.denoiser_folder, torch.float32).state_dict())
        missing = zero.load_weights(engine, weights, trainable_only=lora)
        if missing:
            raise ckpt.CheckpointError(f"{path}: {len(missing)} of the denoiser's weights are not in the "
                                       f"checkpoint, e.g. {missing[:3]}")
        zero.load_optimizer_state(engine, ckpt.load_tensors(path / "optimizer.pt"))

    def apply_optimizer_settings(self, schedule_changed: bool) -> None:
        """Put the configured lr, betas, eps and weight decay into the loaded optimizer; rebuild the schedule at
        the resumed step when its settings changed (so a longer cosine run follows the new curve)."""
        t = self.cfg.train
        for group in self.optimizer.param_groups:
            group["weight_decay"] = t.weight_decay
            if "betas" in group:
                group.update(betas=tuple(t.adam_betas), eps=t.adam_eps)
            if schedule_changed:
                group["initial_lr"] = t.lr
        if schedule_changed:
            from diffusers.optimization import get_scheduler

            self.lr_scheduler = get_scheduler(t.lr_scheduler, self.optimizer, num_warmup_steps=t.warmup_steps,
                                              num_training_steps=t.max_steps, last_epoch=self.step - 1)
            log.info("learning-rate schedule rebuilt at step %d: lr now %.4g", self.step,
                     self.lr_scheduler.get_last_lr()[0])

    def restore_process_state(self, path: Path) -> None:
        from accelerate.utils import send_to_device

        rng = path / f"rng_{self.acc.process_index}.pt"
        if not rng.is_file():
            log.warning("%s has no RNG state for process %d; noise will differ from an uninterrupted run",
                        path, self.acc.process_index)
            self.micro_batches = self.step * self.cfg.train.grad_accum
            return
        state = ckpt.load_tensors(rng)
        ckpt.set_rng_state(state)
        # checkpoints written before the position was recorded: one micro-batch per accumulation step
        self.micro_batches = int(state.get("micro_batches", self.step * self.cfg.train.grad_accum))
        self.skipped["run"] = int(state.get("skipped_pairs", 0))
        self.method.load_state_dict(state.get("method", {}))
        self.held = [send_to_device(b, self.acc.device) for b in state.get("held", [])]
        if self.step % self.cycle and len(self.held) != self.cfg.train.grad_accum * self.method.minibatches:
            log.warning("%s holds no prepared batches for step %d; the method prepares new ones", path, self.step + 1)

    # ------------------------------------------------------------------------------ in-training evaluation
    def evaluate(self) -> None:
        """Sample the eval prompts with the current weights on the main process; log the progress grid."""
        if self.progress_grid is not None:
            wrapped = self.model.denoiser
            denoiser = wrapped if self.sharded else unwrap(wrapped)   # ZeRO-3's hooks are on the inner modules
            self.model.denoiser = denoiser      # no DDP hooks: the other processes are not sampling (sharded:
            denoiser.eval()                     # they are, through the shards, and only the main one writes)
            try:
                with torch.no_grad(), self.acc.autocast():
                    grid = self.progress_grid(self.step)
            finally:
                self.model.denoiser = wrapped
                denoiser.train()
            if grid is not None:
                self.log_grid(grid)
        self.acc.wait_for_everyone()

    def log_grid(self, grid: Any) -> None:
        import numpy as np

        for tracker in self.acc.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"eval/progress": np.asarray(grid)[None]}, step=self.step, dataformats="NHWC")
            elif tracker.name == "wandb":
                tracker.log_images({"eval/progress": [grid]}, step=self.step)

    # ------------------------------------------------------------------------------ the loop
    def prepare_output(self, resume_from: Path | None) -> None:
        """Refuse to mix with another run; on resume drop the metrics of the steps about to be redone."""
        runs.remove_leftovers(self.out)
        if resume_from is not None:
            runs.truncate_metrics(self.out, ckpt.read_state(resume_from)["step"])
        elif self.cfg.train.resume == "latest" and not (self.out / "final").exists():
            runs.truncate_metrics(self.out, 0)      # the same run, killed before its first checkpoint
        else:
            runs.prepare_fresh(self.out, self.cfg.train.overwrite)
        self.out.mkdir(parents=True, exist_ok=True)
        dump_config(self.cfg, self.out / "config.yaml")

    def log_metrics(self, sums: dict[str, torch.Tensor], bar: tqdm, started: float) -> None:
        keys = sorted(sums)
        values = self.acc.reduce(torch.stack([sums[k].to(self.acc.device) for k in keys]), reduction="mean")
        metrics = dict(zip(keys, values.tolist(), strict=True))
        metrics["lr"] = self.lr_scheduler.get_last_lr()[0]
        if self.cfg.data.on_bad_image == "skip_pair":
            skipped = torch.tensor(float(self.skipped["run"]), device=self.acc.device)
            metrics["skipped_pairs"] = int(self.acc.reduce(skipped, reduction="sum").item())
        metrics["steps_per_s"] = (self.step - self._start_step) / max(time.perf_counter() - started, 1e-9)
        self.acc.log(metrics, step=self.step)
        if self.acc.is_main_process:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, **metrics}) + "\n")
            bar.set_postfix({k: f"{metrics[k]:.4g}" for k in ("loss", "implicit_accuracy", "reward")
                            if k in metrics})

    def fit(self) -> Path:
        t, acc = self.cfg.train, self.acc
        path = self.resolve_checkpoint()
        if acc.is_main_process:
            self.prepare_output(path)
        acc.wait_for_everyone()
        self._resume_from(path)
        self._start_step = self.step
        acc.init_trackers(self.cfg.name, config=flat_hparams(self.cfg))
        batches = self.batches()
        bar = tqdm(total=t.max_steps, initial=self.step, disable=not acc.is_main_process, desc=self.cfg.name)
        every = self.cfg.eval.every
        if every and self.step == 0:
            self.evaluate()                  # the starting point: the first column of the progress grid
        started = time.perf_counter()
        while self.step < t.max_steps:
            sums = self.train_step(batches)
            self.step += 1
            bar.update(1)
            if self.step % t.log_every == 0 or self.step == t.max_steps:
                self.resolve_pending()          # nothing is logged, evaluated or saved from a non-finite step
                self.log_metrics(sums, bar, started)
            if every and (self.step % every == 0 or self.step == t.max_steps):
                self.resolve_pending()
                self.evaluate()
            if t.checkpoint_every and self.step % t.checkpoint_every == 0:
                self.resolve_pending()
                self.save_checkpoint()
        self.resolve_pending()
        bar.close()
        final = self.out / "final"
        weights, _ = self.gathered_state()
        if acc.is_main_process:
            ckpt.write_atomic(final, lambda folder: self.save_weights(folder, weights))
        acc.wait_for_everyone()
        acc.end_training()
        return final


def train(cfg: Config) -> Path:
    """Train as configured; returns the folder holding the final weights."""
    return Trainer(cfg).fit()
