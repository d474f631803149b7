"""trl side of scripts/bench_alignprop_trl.py: trl 0.23.1's AlignPropTrainer on a local SD 1.5 folder, timed.

Run by the benchmark with the trl venv's interpreter (it does not import diffalign). One AlignProp epoch here is
one optimizer step: sample ``batch`` images with gradient through the last step(s) and the VAE decoder, score
them with a differentiable reward, backward, clip, step. The last line printed is ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
import warnings

PROCESS_START = time.perf_counter()


def brightness(images, prompts, metadata):
    """Mean pixel value in [0, 1] per image: differentiable, the same arithmetic as diffalign's brightness."""
    return images.float().clamp(0, 1).mean(dim=(1, 2, 3)), {}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pretrained", required=True)
    parser.add_argument("--prompts", required=True, help="JSON list")
    parser.add_argument("--num-steps", type=int, default=10)
    parser.add_argument("--grad-steps", type=int, default=1)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from trl import AlignPropConfig, AlignPropTrainer, DefaultDDPOStableDiffusionPipeline

    imported = time.perf_counter()
    prompts = json.loads(args.prompts)
    position = [0]

    def prompt_fn():
        position[0] += 1
        return prompts[(position[0] - 1) % len(prompts)], {}

    logdir = tempfile.mkdtemp(prefix="alignprop-bench-")
    config = AlignPropConfig(
        exp_name="bench", num_epochs=args.warmup + args.epochs, save_freq=10**9, seed=args.seed, log_with=None,
        logdir=logdir, project_kwargs={"project_dir": logdir}, mixed_precision="no", allow_tf32=False,
        sample_num_steps=args.num_steps, sample_eta=0.0, sample_guidance_scale=args.guidance,
        train_batch_size=len(prompts), train_gradient_accumulation_steps=1, train_learning_rate=args.lr,
        train_adam_weight_decay=1e-2, train_max_grad_norm=1.0,
        truncated_backprop_rand=False, truncated_backprop_timestep=args.num_steps - args.grad_steps,
    )
    from accelerate import PartialState

    PartialState()
    pipeline = DefaultDDPOStableDiffusionPipeline(args.pretrained, use_lora=True)   # LoRA r=4, alpha=4, gaussian
    trainer = AlignPropTrainer(config, brightness, prompt_fn, pipeline)
    trainer.sd_pipeline.set_progress_bar_config(disable=True)
    loaded = time.perf_counter()

    times, cpu_times, global_step = [], [], 0
    load_before = os.getloadavg()[0]
    for epoch in range(config.num_epochs):
        start, cpu = time.perf_counter(), time.process_time()
        global_step = trainer.step(epoch, global_step)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu)
    timed = times[args.warmup:]
    import diffusers
    import trl

    print("RESULT " + json.dumps({
        "side": "trl", "prompts_per_step": len(prompts), "step_s": sum(timed) / len(timed),
        "cpu_step_s": sum(cpu_times[args.warmup:]) / len(timed), "first_step_s": times[0],
        "load": [load_before, os.getloadavg()[0]], "import_s": imported - PROCESS_START, "setup_s": loaded - imported,
        "trainable_params": sum(p.numel() for p in trainer.sd_pipeline.unet.parameters() if p.requires_grad),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "versions": {"trl": trl.__version__, "diffusers": diffusers.__version__, "torch": torch.__version__},
    }), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
