"""Throughput and peak memory of the diffusers Diffusion-DPO SDXL example script on the tiny pipeline (CPU).

The reference script is not part of this repository. Get it from the diffusers repository:

    git clone https://github.com/huggingface/diffusers
    # examples/research_projects/diffusion_dpo/train_diffusion_dpo_sdxl.py
    # measured with diffusers commit 58eb52c0803ea9af3abec60841c2a093bdf1f951
    # (the script's last change: c9c82173068d628b0569ccb6d656adfa37a389e8)

    python scripts/bench_diffusers_dpo.py \
        --script diffusers/examples/research_projects/diffusion_dpo/train_diffusion_dpo_sdxl.py

Same settings as `scripts/bench_dpo.py --family sdxl`: tiny random-weight SDXL, 64 px, 4 pairs/step, LoRA rank 4,
fp32, no gradient checkpointing, gradient accumulation 1, lr 1e-4, 2 threads, 0 data workers. The toy pairs are
written as a local Pick-a-Pic-v2-style parquet split (caption, jpg_0, jpg_1 as JPEG bytes, label_0, label_1),
which the script's `load_dataset(<folder>, split="validation")` reads as-is (the parquet-to-arrow cache is built
before timing). The script runs unmodified as a subprocess, started through a small bootstrap that records a
timestamp at each update of its "Steps" progress bar (one per optimizer step) and, when wandb is not installed,
registers an empty `wandb` module (the script imports it at module level but only uses it to report to wandb).
Two runs with different --max_train_steps give two figures: "in-run", pairs/s between the end of the warm-up
steps and the last step of the longer run (like bench_dpo.py), and "wall diff", (hi - lo) * batch / (t_hi - t_lo)
over whole-process wall times, where start-up and the final LoRA save cancel out (noisier). Peak RSS is the
child's ru_maxrss (os.wait4) in the longer run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def prepare(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    """Tiny SDXL pipeline and a parquet split of toy pairs under ``work``; returns (model dir, dataset dir)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from diffalign.data.toy import write_toy_pairs
    from diffalign.models.tiny import build_tiny_pipeline

    model = work / "sdxl"
    if not (model / "model_index.json").is_file():
        build_tiny_pipeline("sdxl", model)
    data = work / "pickapic"
    if not (data / "validation.parquet").is_file():
        toy = work / "toy"
        pairs = write_toy_pairs(toy, num_pairs=args.pairs, size=args.resolution)
        rows: dict[str, list] = {k: [] for k in ("caption", "jpg_0", "jpg_1", "label_0", "label_1")}
        for i, line in enumerate(pairs.read_text().splitlines()):
            rec = json.loads(line)
            images = []
            for role in ("chosen", "rejected"):
                buf = io.BytesIO()
                Image.open(toy / rec[role]).convert("RGB").save(buf, format="JPEG", quality=95)
                images.append(buf.getvalue())
            flip = i % 2 == 1  # half the rows store the preferred image second, as in Pick-a-Pic
            rows["caption"].append(rec["prompt"])
            rows["jpg_0"].append(images[1] if flip else images[0])
            rows["jpg_1"].append(images[0] if flip else images[1])
            rows["label_0"].append(0.0 if flip else 1.0)
            rows["label_1"].append(1.0 if flip else 0.0)
        data.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(rows), data / "validation.parquet")
    from datasets import load_dataset

    load_dataset(str(data), split="validation", cache_dir=str(work / "hf-datasets-cache"))  # arrow cache, untimed
    return model, data


BOOTSTRAP = """
import atexit, importlib.machinery, importlib.util, json, os, runpy, sys, time
import tqdm.std
stamps, update = [], tqdm.std.tqdm.update
def timed_update(self, n=1):
    out = update(self, n)
    if self.desc == "Steps":
        stamps.append(time.perf_counter())
    return out
tqdm.std.tqdm.update = timed_update
atexit.register(lambda: open(os.environ["STEP_TIMES"], "w").write(json.dumps(stamps)))
if importlib.util.find_spec("wandb") is None:
    sys.modules["wandb"] = importlib.util.module_from_spec(importlib.machinery.ModuleSpec("wandb", None))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_script(args: argparse.Namespace, work: Path, model: Path, data: Path, steps: int) -> dict:
    out_dir, log, times = work / f"out-{steps}", work / f"log-{steps}.txt", work / f"steps-{steps}.json"
    cmd = [sys.executable, "-c", BOOTSTRAP, args.script, f"--pretrained_model_name_or_path={model}",
           f"--dataset_name={data}", "--dataset_split_name=validation", f"--resolution={args.resolution}",
           f"--train_batch_size={args.batch}", f"--rank={args.rank}", f"--max_train_steps={steps}",
           "--gradient_accumulation_steps=1", "--learning_rate=1e-4", "--lr_scheduler=constant",
           "--lr_warmup_steps=0", "--mixed_precision=no", f"--dataloader_num_workers={args.workers}",
           f"--report_to={args.report_to}", f"--output_dir={out_dir}", "--seed=0", "--checkpointing_steps=100000"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false", "STEP_TIMES": str(times),
           "HF_DATASETS_CACHE": str(work / "hf-datasets-cache")}
    with open(log, "w") as fh:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"{args.script} failed with {steps} steps, see {log}:\n{log.read_text()[-3000:]}")
    stamps = json.loads(times.read_text())
    timed = stamps[args.warmup - 1:]  # stamps[k - 1] is the end of step k
    return {"steps": steps, "seconds": elapsed, "peak_rss_mib": usage.ru_maxrss / 1024,
            "in_run_pairs_per_s": (len(timed) - 1) * args.batch / (timed[-1] - timed[0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--script", required=True, help="path to train_diffusion_dpo_sdxl.py")
    parser.add_argument("--steps", default="10,40", help="the two --max_train_steps values, comma-separated")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the in-run figure")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0, help="dataloader worker processes")
    parser.add_argument("--pairs", type=int, default=128, help="rows in the parquet split")
    parser.add_argument("--report_to", default="tensorboard")
    parser.add_argument("--root", default="runs/bench-diffusers")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.root).resolve()
    args.script = str(Path(args.script).resolve())
    model, data = prepare(args, work)
    lo, hi = sorted(int(s) for s in args.steps.split(","))
    runs = [run_script(args, work, model, data, n) for n in (lo, hi)]
    wall = (hi - lo) * args.batch / (runs[1]["seconds"] - runs[0]["seconds"])
    print(f"diffusers train_diffusion_dpo_sdxl.py, sdxl, {args.resolution} px, {args.batch} pairs/step, "
          f"LoRA rank {args.rank}, {args.threads} threads, {args.workers} data workers, runs of {lo} and {hi} steps")
    for r in runs:
        print(f"  {r['steps']:4d} steps: {r['seconds']:7.2f} s wall, in-run {r['in_run_pairs_per_s']:.2f} pairs/s "
              f"after {args.warmup} warm-up steps, peak RSS {r['peak_rss_mib']:.0f} MiB")
    print(f"{'mode':20s} {'pairs/s':>9s} {'steps/s':>9s} {'peak RSS MiB':>13s}")
    for name, rate in (("diffusers in-run", runs[1]["in_run_pairs_per_s"]), ("diffusers wall diff", wall)):
        print(f"{name:20s} {rate:9.2f} {rate / args.batch:9.2f} {runs[1]['peak_rss_mib']:13.0f}")


if __name__ == "__main__":
    main()
