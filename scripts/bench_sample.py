"""Sampling throughput of diffalign's evaluation sampler against the diffusers pipeline it reproduces.

    python scripts/bench_sample.py                         # tiny SD1.5 and SDXL, 64 px, batch 4, 20 DDIM steps
    python scripts/bench_sample.py --families sdxl --resolution 128 --steps 30 --scheduler euler_ancestral
    python scripts/bench_sample.py --pretrained stabilityai/stable-diffusion-xl-base-1.0 --resolution 1024  # GPU

Both sides get the same prompts, seeds (one CPU generator per image), scheduler and guidance, in alternating
repetitions; the script prints images/s (median of the timed repetitions) and the largest pixel difference
between the two outputs, which should be 0.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench(pretrained: str, args: argparse.Namespace) -> dict:
    from diffusers import DiffusionPipeline

    from diffalign.config import ModelConfig
    from diffalign.eval.generate import generate, make_scheduler
    from diffalign.models import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    model = load_model(ModelConfig(pretrained=pretrained), device, dtype)
    sched = make_scheduler(model, args.scheduler)
    pipe = DiffusionPipeline.from_pretrained(pretrained, torch_dtype=dtype).to(device)
    pipe.scheduler = type(sched).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    prompts = [f"a photo of object number {i}" for i in range(args.batch)]
    seeds = list(range(args.batch))
    size = (args.resolution, args.resolution)

    def ours() -> torch.Tensor:
        return generate(model, sched, prompts, seeds, size, args.steps, args.guidance)

    def theirs() -> torch.Tensor:
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return pipe(prompts, height=size[0], width=size[1], num_inference_steps=args.steps, generator=gens,
                    guidance_scale=args.guidance, output_type="pt").images.float().cpu()

    times: dict[str, list[float]] = {"diffalign": [], "diffusers": []}
    outputs = {}
    for rep in range(args.warmup + args.reps):
        for name, fn in (("diffalign", ours), ("diffusers", theirs)):
            sync()
            start = time.perf_counter()
            outputs[name] = fn()
            sync()
            if rep >= args.warmup:
                times[name].append(time.perf_counter() - start)
    diff = (outputs["diffalign"] - outputs["diffusers"]).abs().max().item()
    return {name: args.batch / statistics.median(t) for name, t in times.items()} | {"max_abs_diff": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["sd15", "sdxl"], help="tiny pipelines to build")
    parser.add_argument("--pretrained", help="benchmark this pipeline instead of the tiny ones")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--scheduler", default="ddim")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.pretrained:
        targets = {args.pretrained: args.pretrained}
    else:
        from diffalign.models.tiny import build_tiny_pipeline

        root = Path(tempfile.mkdtemp(prefix="bench_sample_"))
        targets = {fam: str(build_tiny_pipeline(fam, root / fam)) for fam in args.families}
    print(f"{args.batch} images x {args.steps} {args.scheduler} steps at {args.resolution} px, guidance "
          f"{args.guidance}, {args.reps} timed repetitions (median)")
    print(f"{'model':24s} {'diffalign img/s':>16s} {'diffusers img/s':>16s} {'ratio':>6s} {'max |diff|':>10s}")
    for name, path in targets.items():
        r = bench(path, args)
        print(f"{name[-24:]:24s} {r['diffalign']:16.2f} {r['diffusers']:16.2f} "
              f"{r['diffalign'] / r['diffusers']:6.2f} {r['max_abs_diff']:10.2e}")


if __name__ == "__main__":
    main()
