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
from diffalign.config import Config, dump_config, to_dict
from diffalign.data import open_training_data
from diffalign.data.sampler import EpochBatches
from diffalign.models import load_model
from diffalign.models.base import DTYPES, DiffusionModel, unwrap
from diffalign.models.lora import add_lora, load_lora, save_lora

log = logging.getLogger("diffalign")


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient: training stopped before the bad update was applied."""


def build_optimizer(cfg: Config, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=t.lr, weight_decay=t.weight_decay, scale_parameter=False,
                         relative_step=False, warmup_init=False)
    return torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps,
                             weight_decay=t.weight_decay)


def make_trainable(model: DiffusionModel, cfg: Config, needs_reference: bool) -> list[torch.nn.Parameter]:
    """LoRA adapters (reference = adapters disabled) or the whole UNet (reference = a frozen copy)."""
    if cfg.lora.enabled:
        params = add_lora(model.unet, cfg.lora)
    else:
        if needs_reference:
            model.ref_unet = copy.deepcopy(model.unet).requires_grad_(False).eval()
        model.unet.to(torch.float32).requires_grad_(True)
        params = list(model.unet.parameters())
    if cfg.train.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    model.unet.train()
    return params


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


class Trainer:
    def __init__(self, cfg: Config) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        t = cfg.train
        self.acc = Accelerator(mixed_precision=t.mixed_precision, project_dir=str(self.out), cpu=_cpu_only(),
                               log_with=None if t.report_to == "none" else t.report_to)
        _check_world(self.acc.num_processes)
        set_seed(t.seed, device_specific=True)
        self.method = cfg.method
        self.model = load_model(cfg.model, self.acc.device, DTYPES[t.mixed_precision])
        self.params = make_trainable(self.model, cfg, getattr(self.method, "needs_reference", False))
        self.data = open_training_data(cfg, self.model)
        if hasattr(self.data, "repeat_to"):          # a short prompt list still fills a global batch
            self.data.repeat_to(t.batch_size * self.acc.num_processes)
        self.optimizer = build_optimizer(cfg, self.params)
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler(t.lr_scheduler, self.optimizer, num_warmup_steps=t.warmup_steps,
                                          num_training_steps=t.max_steps)
        self.model.unet, self.optimizer = self.acc.prepare(self.model.unet, self.optimizer)
        self.step = 0
        self.progress_grid = None
        if cfg.eval.every and self.acc.is_main_process:
            from diffalign.eval.monitor import ProgressGrid

            self.progress_grid = ProgressGrid(cfg, self.model)

    # ------------------------------------------------------------------------------ data
    def batches(self) -> Iterator[dict]:
        """Micro-batches from the current position on; the position is derived from the step count."""
        t, acc = self.cfg.train, self.acc
        per_epoch = EpochBatches.per_epoch(len(self.data), t.batch_size, acc.num_processes)
        if per_epoch == 0:
            raise ValueError(f"{self.cfg.data.path}: {len(self.data)} examples are fewer than one global batch "
                             f"({t.batch_size} x {acc.num_processes} processes)")
        epoch, start = divmod(self.step * t.grad_accum, per_epoch)
        while True:
            self.data.set_epoch(epoch)
            order = EpochBatches(len(self.data), t.batch_size, t.seed, epoch, start, acc.process_index,
                                 acc.num_processes)
            loader = torch.utils.data.DataLoader(
                self.data, batch_sampler=order, collate_fn=self.data.collate, num_workers=self.cfg.data.num_workers,
                generator=torch.Generator().manual_seed(t.seed), persistent_workers=False)
            yield from loader
            epoch, start = epoch + 1, 0

    # ------------------------------------------------------------------------------ one optimizer step
    def train_step(self, batches: Iterator[dict]) -> dict[str, torch.Tensor]:
        t, acc = self.cfg.train, self.acc
        sums: dict[str, torch.Tensor] = {}
        own_sync = getattr(self.method, "many_grad_calls", False)
        for i in range(t.grad_accum):
            batch = next(batches)
            while batch["indices"].numel() == 0:     # every pair of the batch was unreadable (skip_pair)
                batch = next(batches)
            last = i == t.grad_accum - 1 and not own_sync
            with contextlib.nullcontext() if last else acc.no_sync(self.model.unet):
                with acc.autocast():
                    loss, metrics = self.method.loss(self.model, batch)
                acc.backward(loss / t.grad_accum)
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0) + value.float() / t.grad_accum
        if own_sync:
            self.average_gradients()
        max_norm = t.max_grad_norm if t.max_grad_norm is not None else math.inf
        grad_norm = acc.clip_grad_norm_(self.params, max_norm)
        self.check_finite(sums["loss"], grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        sums["grad_norm"] = grad_norm.detach().float() if torch.is_tensor(grad_norm) else torch.tensor(grad_norm)
        return sums

    def average_gradients(self) -> None:
        """All-reduce gradients by hand, for methods that call the UNet with gradient several times per backward.

        DDP's reducer expects one forward per backward (and a checkpointed UNet re-runs its forward inside
        backward), so such methods run every micro-batch under no_sync and their gradients are averaged here.
        """
        if self.acc.num_processes == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = self.acc.reduce(torch.cat([g.flatten() for g in grads]), reduction="mean")
        for p, g in zip(self.params, flat.split([g.numel() for g in grads]), strict=True):
            p.grad = g.view_as(p).to(p.dtype)

    def check_finite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Stop, on every process alike, before a non-finite update is applied."""
        bad = (~torch.isfinite(loss.detach().to(self.acc.device))).float()
        if self.cfg.train.mixed_precision != "fp16":   # in fp16 the grad scaler skips inf steps itself
            bad = bad + (~torch.isfinite(torch.as_tensor(grad_norm, device=self.acc.device))).float()
        if self.acc.reduce(bad, reduction="sum").item() > 0:
            last = ckpt.checkpoints(self.out)
            raise TrainingDiverged(
                f"non-finite loss or gradient at step {self.step + 1}; the update was not applied and nothing "
                f"was written. Last good checkpoint: {last[-1] if last else 'none'}. Try a lower train.lr, "
                f"train.mixed_precision=bf16, or model.vae_dtype=float32.")

    # ------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        acc, target = self.acc, self.out / f"checkpoint-{self.step}"
        tmp = target.with_name(f".tmp-{target.name}")
        if acc.is_main_process:
            ckpt.temp_dir(target)
        acc.wait_for_everyone()
        torch.save(ckpt.rng_state(), tmp / f"rng_{acc.process_index}.pt")
        acc.wait_for_everyone()
        if acc.is_main_process:
            self._fill_checkpoint(tmp)
            ckpt.commit(tmp, target)
            ckpt.prune(self.out, self.cfg.train.keep_last)
        acc.wait_for_everyone()
        return target

    def _fill_checkpoint(self, directory: Path) -> None:
        self.save_weights(directory)
        torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")
        torch.save(self.lr_scheduler.state_dict(), directory / "scheduler.pt")
        ckpt.write_state(directory, {"step": self.step, "micro_batches": self.step * self.cfg.train.grad_accum,
                                     "num_processes": self.acc.num_processes, "config": to_dict(self.cfg)})

    def save_weights(self, directory: Path) -> None:
        if self.cfg.lora.enabled:
            save_lora(self.model, directory)
        else:
            unwrap(self.model.unet).save_pretrained(directory / "unet", safe_serialization=True)
        dump_config(self.cfg, directory / "config.yaml")

    def resume(self) -> None:
        path = ckpt.resolve_resume(self.out, self.cfg.train.resume)
        if path is None:
            if self.cfg.train.resume:
                log.info("train.resume=%s: no checkpoint in %s, starting from step 0", self.cfg.train.resume, self.out)
            return
        unet = unwrap(self.model.unet)
        if self.cfg.lora.enabled:
            load_lora(unet, path)
        else:
            from diffusers import UNet2DConditionModel

            unet.load_state_dict(UNet2DConditionModel.from_pretrained(path / "unet").state_dict())
        self.optimizer.load_state_dict(ckpt.load_tensors(path / "optimizer.pt"))
        self.lr_scheduler.load_state_dict(ckpt.load_tensors(path / "scheduler.pt"))
        rng = path / f"rng_{self.acc.process_index}.pt"
        if rng.is_file():
            ckpt.set_rng_state(ckpt.load_tensors(rng))
        else:
            log.warning("%s has no RNG state for process %d; noise will differ from an uninterrupted run",
                        path, self.acc.process_index)
        self.step = ckpt.read_state(path)["step"]
        log.info("resumed from %s at step %d", path, self.step)

    # ------------------------------------------------------------------------------ in-training evaluation
    def evaluate(self) -> None:
        """Sample the eval prompts with the current weights on the main process; log the progress grid."""
        if self.progress_grid is not None:
            wrapped = self.model.unet
            unet = unwrap(wrapped)
            self.model.unet = unet          # no DDP hooks: the other processes are not sampling
            unet.eval()
            try:
                with torch.no_grad(), self.acc.autocast():
                    grid = self.progress_grid(self.step)
            finally:
                self.model.unet = wrapped
                unet.train()
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
    def log_metrics(self, sums: dict[str, torch.Tensor], bar: tqdm, started: float) -> None:
        keys = sorted(sums)
        values = self.acc.reduce(torch.stack([sums[k].to(self.acc.device) for k in keys]), reduction="mean")
        metrics = dict(zip(keys, values.tolist(), strict=True))
        metrics["lr"] = self.lr_scheduler.get_last_lr()[0]
        metrics["steps_per_s"] = (self.step - self._start_step) / max(time.perf_counter() - started, 1e-9)
        self.acc.log(metrics, step=self.step)
        if self.acc.is_main_process:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, **metrics}) + "\n")
            bar.set_postfix({k: f"{metrics[k]:.4g}" for k in ("loss", "implicit_accuracy", "reward")
                            if k in metrics})

    def fit(self) -> Path:
        t, acc = self.cfg.train, self.acc
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            dump_config(self.cfg, self.out / "config.yaml")
        self.resume()
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
                self.log_metrics(sums, bar, started)
            if every and (self.step % every == 0 or self.step == t.max_steps):
                self.evaluate()
            if t.checkpoint_every and self.step % t.checkpoint_every == 0:
                self.save_checkpoint()
        bar.close()
        final = self.out / "final"
        if acc.is_main_process:
            ckpt.write_atomic(final, self.save_weights)
        acc.wait_for_everyone()
        acc.end_training()
        return final


def train(cfg: Config) -> Path:
    """Train as configured; returns the folder holding the final weights."""
    return Trainer(cfg).fit()
