"""trl side of scripts/bench_grpo_trl.py: trl 0.23.1's DDPOTrainer on a local SD 1.5 pipeline folder, timed.

Run by the benchmark with the trl venv's interpreter (it does not import diffalign):

    /work/trl-venv/bin/python scripts/_ddpo_trl_child.py --pretrained /work/bench-ddpo/sd15 --epochs 6 ...

One DDPO epoch = sample (sample_batch_size images, one batch) + reward + one inner epoch of training on every
timestep with gradient accumulation over all of them, i.e. exactly one optimizer step. The phases are timed by
wrapping the trainer's own methods (_generate_samples, compute_rewards, _train_batched_samples); the last line
printed is ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import tempfile
import time
import warnings

PROCESS_START = time.perf_counter()
# the prompts both trl benchmarks train on, on both sides
PROMPTS = ["a red circle", "a red square", "a green circle", "a green square",
           "a blue circle", "a blue square", "a yellow circle", "a yellow square"]


def jpeg_compressibility(images, prompts, metadata):
    """Minus the JPEG size in kB (1 kB = 1000 bytes) at quality 95 of each image (DDPO's compressibility reward).

    images: [B,3,H,W] floats in [0,1] (DDPOTrainer samples with output_type="pt"). Same arithmetic as
    diffalign.rewards' jpeg_compressibility: clamp, *255, round, uint8, PIL JPEG quality 95.
    """
    import torch
    from PIL import Image

    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000)
    return -torch.tensor(sizes, dtype=torch.float32), {}


def group_prompts(prompts: list[str], group: int):
    """A prompt_fn that yields every prompt `group` times in a row, cycling: each sampling batch of
    len(prompts) * group images holds each prompt exactly `group` times, as diffalign's GRPO batch does."""
    order = [p for p in prompts for _ in range(group)]
    position = [0]

    def prompt_fn():
        prompt = order[position[0] % len(order)]
        position[0] += 1
        return prompt, {}

    return prompt_fn


def child_env(threads: int) -> dict[str, str]:
    """The environment both sides of a benchmark run in: the same thread counts, offline, quiet."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
            "DIFFALIGN_LOG": "WARNING", "TOKENIZERS_PARALLELISM": "false"}


def run_child(cmd: list[str], env: dict[str, str], label: str) -> tuple[dict, float]:
    """Run one side in a fresh process: (the dict it printed as its last ``RESULT {json}`` line, wall seconds)."""
    import subprocess
    import sys

    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        sys.exit(f"{label} failed with code {out.returncode}:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return json.loads(lines[-1][7:]), wall


class PhaseTimer:
    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start
        return timed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pretrained", required=True)
    parser.add_argument("--prompts", required=True, help="JSON list")
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--num-steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--eta", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--weight-decay", type=float, default=1e-2)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    imported = time.perf_counter()
    prompts = json.loads(args.prompts)
    images_per_epoch = len(prompts) * args.group
    logdir = tempfile.mkdtemp(prefix="ddpo-bench-")
    config = DDPOConfig(
        exp_name="bench", num_epochs=args.warmup + args.epochs, save_freq=10**9, seed=args.seed, log_with=None,
        logdir=logdir, project_kwargs={"project_dir": logdir}, mixed_precision="no", allow_tf32=False,
        sample_num_steps=args.num_steps, sample_eta=args.eta, sample_guidance_scale=args.guidance,
        sample_batch_size=images_per_epoch, sample_num_batches_per_epoch=1,     # all images in one sampling batch
        train_batch_size=images_per_epoch, train_gradient_accumulation_steps=1,  # -> one optimizer step per epoch
        train_learning_rate=args.lr, train_adam_weight_decay=args.weight_decay, train_max_grad_norm=1.0,
        train_num_inner_epochs=1, train_cfg=True, train_timestep_fraction=1.0, train_clip_range=1e-4,
        train_adv_clip_max=5.0, per_prompt_stat_tracking=False, async_reward_computation=False,
    )
    from accelerate import PartialState

    PartialState()   # trl 0.23.1 logs through accelerate's logger before DDPOTrainer creates the Accelerator
    pipeline = DefaultDDPOStableDiffusionPipeline(args.pretrained, use_lora=True)   # LoRA r=4, alpha=4, gaussian
    trainer = DDPOTrainer(config, jpeg_compressibility, group_prompts(prompts, args.group), pipeline)
    trainer.sd_pipeline.set_progress_bar_config(disable=True)
    loaded = time.perf_counter()

    timer = PhaseTimer()
    for name in ("_generate_samples", "compute_rewards", "_train_batched_samples"):
        setattr(trainer, name, timer.wrap(name, getattr(trainer, name)))
    sd = trainer.sd_pipeline.sd_pipeline
    sd.text_encoder.forward = timer.wrap("text", sd.text_encoder.forward)
    sd.vae.decode = timer.wrap("decode", sd.vae.decode)
    trainer.accelerator.backward = timer.wrap("backward", trainer.accelerator.backward)
    optimizer_steps = [0]
    real_step = trainer.optimizer.optimizer.step          # accelerate's wrapper skips steps while accumulating

    def counted_step(*a, **k):
        optimizer_steps[0] += 1
        return real_step(*a, **k)

    counted_step = timer.wrap("optimizer", counted_step)

    trainer.optimizer.optimizer.step = counted_step

    epoch_times, cpu_times, global_step, phases_after_warmup = [], [], 0, None
    load_before = os.getloadavg()[0]
    for epoch in range(config.num_epochs):
        if epoch == args.warmup:
            phases_after_warmup = dict(timer.totals)
        start, cpu = time.perf_counter(), time.process_time()
        global_step = trainer.step(epoch, global_step)
        epoch_times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu)
    timed = epoch_times[args.warmup:]
    phases = {k: (v - phases_after_warmup.get(k, 0.0)) / len(timed) for k, v in timer.totals.items()}
    sample, update = phases["_generate_samples"], phases["_train_batched_samples"]
    lora = [p for p in trainer.sd_pipeline.unet.parameters() if p.requires_grad]
    result = {
        "side": "trl", "images_per_step": images_per_epoch, "timed_steps": len(timed),
        "step_s": sum(timed) / len(timed), "steps_per_s": len(timed) / sum(timed), "epoch_times": epoch_times,
        "cpu_step_s": sum(cpu_times[args.warmup:]) / len(timed), "load": [load_before, os.getloadavg()[0]],
        "phase_s": {"sample (incl. text encode, VAE decode)": phases["_generate_samples"],
                    "reward": phases["compute_rewards"], "update": phases["_train_batched_samples"]},
        "sample_detail_s": {"text encode": phases["text"], "rollout (UNet)": sample - phases["text"] - phases["decode"],
                            "VAE decode": phases["decode"]},
        "update_detail_s": {"loss forward": update - phases["backward"] - phases["optimizer"],
                            "backward": phases["backward"], "optimizer.step": phases["optimizer"]},
        "optimizer_steps": optimizer_steps[0], "epochs": config.num_epochs,
        "trainable_params": sum(p.numel() for p in lora), "num_train_timesteps": trainer.num_train_timesteps,
        "import_s": imported - PROCESS_START, "setup_s": loaded - imported,
        "in_process_s": time.perf_counter() - PROCESS_START, "threads": torch.get_num_threads(),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "timesteps": trainer.sd_pipeline.scheduler.timesteps.tolist(), "versions": _versions(),
    }
    print("RESULT " + json.dumps(result), flush=True)


def _versions() -> dict[str, str]:
    import diffusers
    import peft
    import torch
    import transformers
    import trl

    return {"trl": trl.__version__, "diffusers": diffusers.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
