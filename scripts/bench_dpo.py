"""Training throughput and peak memory, cached vs uncached, on a tiny pipeline (CPU by default).

    python scripts/bench_dpo.py                          # tiny SDXL, 64 px, 4 pairs/step, LoRA rank 4
    python scripts/bench_dpo.py --family sd15 --steps 50
    python scripts/bench_dpo.py --method mapo --modes cached --full-ft    # MaPO vs DPO: --method dpo|mapo|inpo
    python scripts/bench_dpo.py --modes cached,precomputed --full-ft      # DPO with precomputed reference errors

Each mode runs in its own process so that peak resident memory (ru_maxrss) belongs to that mode alone.
The uncached mode VAE-encodes and text-encodes every batch, which is the per-step work of the diffusers
Diffusion-DPO example script; the cached mode reads latents and embeddings written by `diffalign cache`; the
precomputed mode also reads the reference model's errors (`diffalign cache ... data.reference_epochs=E`,
`method.reference=precomputed`), so a step runs no reference forward and full fine-tuning keeps no frozen copy.
The time to precompute is printed apart.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def run_mode(args: argparse.Namespace) -> dict:
    import torch

    from diffalign.config import load_config
    from diffalign.data.cache import build_cache
    from diffalign.models import load_model
    from diffalign.trainer import Trainer

    torch.set_num_threads(args.threads)
    root = Path(args.root)
    overrides = [f"model.pretrained={root / args.family}", f"data.path={root / 'toy' / 'pairs.jsonl'}",
                 f"output_dir={root / ('run-' + args.mode)}", f"data.resolution={args.resolution}",
                 f"train.batch_size={args.batch}", f"lora.rank={args.rank}", "train.report_to=none",
                 f"data.num_workers={args.workers}", f"method.name={args.method}", "train.lr=1e-4",
                 f"train.max_steps={args.warmup + args.steps}"]
    if args.full_ft:
        overrides.append("lora.enabled=false")
    if args.mode in ("cached", "precomputed"):
        overrides.append(f"data.cache_dir={root / ('cache-' + args.family)}")
    if args.mode == "precomputed":
        epochs = -(-(args.warmup + args.steps) * args.batch // 128)     # the toy set has 128 pairs
        overrides += [f"data.reference_epochs={epochs}", "method.reference=precomputed"]
    cfg = load_config(None, overrides)
    precompute_s = 0.0
    if args.mode in ("cached", "precomputed"):
        build_cache(cfg, load_model(cfg.model))
    if args.mode == "precomputed":
        from diffalign.data.reference import ERRORS_FILE, build_reference_errors

        (Path(cfg.data.cache_dir) / ERRORS_FILE).unlink(missing_ok=True)     # time a fresh precomputation
        started = time.perf_counter()
        build_reference_errors(cfg)
        precompute_s = time.perf_counter() - started
    trainer = Trainer(cfg)
    batches = trainer.batches()
    for _ in range(args.warmup):
        trainer.train_step(batches)
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step(batches)
    elapsed = time.perf_counter() - start
    return {"mode": args.mode, "method": args.method, "steps_per_s": args.steps / elapsed,
            "pairs_per_s": args.steps * args.batch / elapsed, "precompute_s": precompute_s,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def prepare(args: argparse.Namespace) -> None:
    from diffalign.data.toy import write_toy_pairs
    from diffalign.models.tiny import build_tiny_pipeline

    root = Path(args.root)
    build_tiny_pipeline(args.family, root / args.family)
    if not (root / "toy" / "pairs.jsonl").is_file():
        write_toy_pairs(root / "toy", num_pairs=128, size=args.resolution)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sdxl", choices=["sd15", "sd2", "sdxl"])
    parser.add_argument("--method", default="dpo")
    parser.add_argument("--modes", default="uncached,cached")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--full-ft", action="store_true", help="full fine-tuning (DPO/InPO keep a frozen UNet copy)")
    parser.add_argument("--workers", type=int, default=0, help="dataloader worker processes")
    parser.add_argument("--root", default="runs/bench")
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.mode:
        print("RESULT " + json.dumps(run_mode(args)))
        return
    prepare(args)
    results = []
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--mode", mode]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DIFFALIGN_LOG": "WARNING"})
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode or not lines:
            sys.exit(f"{mode} failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(lines[-1][7:]))
    tuning = "full fine-tuning" if args.full_ft else f"LoRA rank {args.rank}"
    print(f"{args.family}, {args.resolution} px, {args.batch} pairs/step, {tuning}, method {args.method}, "
          f"{args.threads} threads, {args.workers} data workers, {args.steps} timed steps after {args.warmup} warm-up")
    print(f"{'mode':11s} {'pairs/s':>9s} {'steps/s':>9s} {'peak RSS MiB':>13s}")
    for r in results:
        extra = f"   (precomputing the reference errors took {r['precompute_s']:.1f} s)" if r["precompute_s"] else ""
        print(f"{r['mode']:11s} {r['pairs_per_s']:9.2f} {r['steps_per_s']:9.2f} {r['peak_rss_mib']:13.0f}{extra}")
    if len(results) == 2:
        print(f"speed-up {results[1]['mode']} / {results[0]['mode']}: "
              f"{results[1]['pairs_per_s'] / results[0]['pairs_per_s']:.2f}x")


if __name__ == "__main__":
    main()
