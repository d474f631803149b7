"""Full-size checks on CPU: real SD 1.5 / SDXL-base architectures with random weights, one small job per stage.

    python scripts/check_full_size.py --family sdxl --stages cache --out runs/full_size
    python scripts/check_full_size.py --family sd15 --stages train cache cached resume lora eval

Each stage runs as its own process; the table gives its wall time and peak resident memory (from the kernel's
rusage of that process). Stages:

    cache   `diffalign cache` of 8 pairs at --resolution px: loads the VAE and text encoders only, on the
            process's device, in their configured dtypes, encoding --cache-batch pairs at a time
    train   one DPO step, uncached: LoRA, bf16 autocast, gradient checkpointing, 1 pair, checkpoint at step 1
    cached  one DPO step from the cache (run `cache` first)
    resume  `train.resume=latest` from the train stage's checkpoint-1 to step 2
    lora    the train stage's final LoRA loaded by the diffusers pipeline (`load_lora_weights`): modules counted
    eval    `diffalign eval`: base and the trained LoRA, 1 prompt x 1 seed, 2 sampler steps, brightness
The stages from `train` on need the full pipeline with its UNet (written once, bf16).

Not part of the test suite: building SDXL's encoders takes about a minute and 3.5 GB of disk.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {"sd15": "configs/dpo_sd15.yaml", "sdxl": "configs/dpo_sdxl.yaml"}


def measured(cmd: list[str]) -> tuple[int, float, float, str]:
    """(exit code, seconds, peak RSS in GiB, last stderr lines) of one child process."""
    import tempfile

    with tempfile.TemporaryFile("w+") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)        # reaped here, so the rusage is this child's alone
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - started
        log.seek(0)
        tail = "\n".join(log.read().strip().splitlines()[-3:])
    return proc.returncode, seconds, usage.ru_maxrss / 2**20, tail


def stage_cache(family: str, pipeline: Path, data: Path, out: Path, args: argparse.Namespace) -> dict:
    cache = out / f"cache-{family}"
    cmd = [sys.executable, "-m", "diffalign.cli", "cache", CONFIGS[family], f"model.pretrained={pipeline}",
           f"data.path={data}", f"data.cache_dir={cache}", f"data.resolution={args.resolution}",
           f"data.cache_batch_size={args.cache_batch}", "data.num_workers=0", "model.vae=null",
           f"output_dir={out / 'run'}"]
    code, seconds, rss, tail = measured(cmd)
    row = {"stage": "cache", "family": family, "exit": code, "seconds": seconds, "peak_rss_gib": rss}
    if code == 0:
        manifest = json.loads((cache / "manifest.json").read_text())
        row.update(device=manifest["device"], pairs=manifest["num_pairs"])
    else:
        row["error"] = tail
    return row


def _train_cmd(family: str, pipeline: Path, data: Path, out: Path, args: argparse.Namespace, run: str,
               *extra: str) -> list[str]:
    return [sys.executable, "-m", "diffalign.cli", "train", CONFIGS[family], f"model.pretrained={pipeline}",
            f"data.path={data}", f"data.resolution={args.resolution}", "data.num_workers=0", "model.vae=null",
            "train.batch_size=1", "train.grad_accum=1", "train.mixed_precision=bf16",
            "train.gradient_checkpointing=true", "train.checkpoint_every=1", "train.log_every=1",
            "train.report_to=none", "eval.every=0", f"output_dir={out / run}", *extra]


def _row(stage: str, family: str, result: tuple[int, float, float, str], **extra: object) -> dict:
    code, seconds, rss, tail = result
    row = {"stage": stage, "family": family, "exit": code, "seconds": seconds, "peak_rss_gib": rss, **extra}
    if code:
        row["error"] = tail
    return row


def stage_train(family: str, pipeline: Path, data: Path, out: Path, args: argparse.Namespace) -> dict:
    cmd = _train_cmd(family, pipeline, data, out, args, f"train-{family}", "train.max_steps=1",
                     "train.overwrite=true")
    return _row("train", family, measured(cmd), device="cpu")


def stage_cached(family: str, pipeline: Path, data: Path, out: Path, args: argparse.Namespace) -> dict:
    cmd = _train_cmd(family, pipeline, data, out, args, f"cached-{family}", "train.max_steps=1",
                     "train.overwrite=true", f"data.cache_dir={out / f'cache-{family}'}")
    return _row("cached", family, measured(cmd), device="cpu")


def stage_resume(family: str, pipeline: Path, data: Path, out: Path, args: argparse.Namespace) -> dict:
    cmd = _train_cmd(family, pipeline, data, out, args, f"train-{family}", "train.max_steps=2",
                     "train.resume=latest")
    result = measured(cmd)
    rows = (out / f"train-{family}" / "metrics.jsonl").read_text().splitlines() if result[0] == 0 else []
    return _row("resume", family, result, device=f"steps logged {[json.loads(r)['step'] for r in rows]}")


LORA_CHECK = """
import sys, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], torch_dtype=torch.bfloat16)
pipe.load_lora_weights(sys.argv[2], adapter_name="run")
denoiser = getattr(pipe, "unet", None) or pipe.transformer
print("LOADED", sum(1 for m in denoiser.modules() if "run" in getattr(m, "lora_A", {})))
"""


def stage_lora(family: str, pipeline: Path, data: Path, out: Path, args: argparse.Namespace) -> dict:
    from safetensors import safe_open

    weights = out / f"train-{family}" / "final"
    with safe_open(str(weights / "pytorch_lora_weights.safetensors"), "pt") as f:
        modules = len({k.rsplit(".lora", 1)[0] for k in f.keys()})
    cmd = [sys.executable, "-c", LORA_CHECK, str(pipeline), str(weights)]
    result = measured(cmd)
    loaded = result[3].split("LOADED")[-1].strip() if "LOADED" in result[3] else "?"
    return _row("lora", family, result, device=f"{loaded} of {modules} LoRA modules loaded by diffusers")


def stage_eval(family: str, pipeline: Path, data: Path, out: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "diffalign.cli", "eval", CONFIGS[family], f"model.pretrained={pipeline}",
           "model.vae=null", f"output_dir={out / f'eval-{family}'}", "eval.prompts=[a red fox in the snow]",
           "eval.seeds=[0]", "eval.num_steps=2", f"eval.resolution={args.resolution}", "eval.rewards=[brightness]",
           f"eval.checkpoints=[{out / f'train-{family}'}]", "eval.batch_size=1"]
    result = measured(cmd)
    images = len(list((out / f"eval-{family}").rglob("*.png"))) if result[0] == 0 else 0
    return _row("eval", family, result, device=f"{images} PNG files written (images and grids)")


STAGES = {"cache": stage_cache, "train": stage_train, "cached": stage_cached, "resume": stage_resume,
          "lora": stage_lora, "eval": stage_eval}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=["sd15", "sdxl"], nargs="+", default=["sd15", "sdxl"])
    parser.add_argument("--stages", choices=list(STAGES), nargs="+", default=list(STAGES))
    parser.add_argument("--out", default="runs/full_size")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--cache-batch", type=int, default=2)
    args = parser.parse_args()

    from diffalign.data.toy import write_toy_pairs
    from diffalign.models.full_size import build_full_size_pipeline

    out = Path(args.out)
    data = write_toy_pairs(out / "pairs", num_pairs=8, size=args.resolution)
    rows = []
    for family in args.family:
        started = time.perf_counter()
        with_unet = any(stage != "cache" for stage in args.stages)
        name = f"{family}-full" if with_unet else f"{family}-encoders"
        pipeline = build_full_size_pipeline(family, out / name, unet=with_unet)
        print(f"{family}: full-size pipeline in {pipeline} ({time.perf_counter() - started:.0f} s)", flush=True)
        for stage in args.stages:
            rows.append(STAGES[stage](family, pipeline, data, out, args))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| stage | family | exit | seconds | peak RSS (GiB) | device |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['family']} | {r['exit']} | {r['seconds']:.1f} | {r['peak_rss_gib']:.2f} | "
              f"{r.get('device', r.get('error', ''))} |")


if __name__ == "__main__":
    main()
