"""Full-size checks on CPU: real SD 1.5 / SDXL-base architectures with random weights, one small job per stage.

    python scripts/check_full_size.py --family sdxl --stages cache --out runs/full_size

Each stage runs as its own `diffalign` process; the table gives its wall time and peak resident memory (from the
kernel's rusage of that process). Stages so far:

    cache   `diffalign cache` of 8 pairs at --resolution px: loads the VAE and text encoders only, on the
            process's device, in their configured dtypes, encoding --cache-batch pairs at a time

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


STAGES = {"cache": stage_cache}


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
        pipeline = build_full_size_pipeline(family, out / f"{family}-encoders", unet=False)
        print(f"{family}: encoders at full size in {pipeline} ({time.perf_counter() - started:.0f} s)", flush=True)
        for stage in args.stages:
            rows.append(STAGES[stage](family, pipeline, data, out, args))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| stage | family | exit | seconds | peak RSS (GiB) | device |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['family']} | {r['exit']} | {r['seconds']:.1f} | {r['peak_rss_gib']:.2f} | "
              f"{r.get('device', r.get('error', ''))} |")


if __name__ == "__main__":
    main()
