"""Peak memory of training-style reading of a large Pick-a-Pic-schema parquet set, measured from /proc.

    python scripts/measure_parquet_rss.py --out /work/exp15/pickapic-20g --size-gb 20 --workers 2 \
        [--seconds S | --max-pairs N] [--old-gb 2] [--keep]

1. Generates ``--size-gb`` of parquet shards (``--file-mb`` per file, ``--group-rows`` rows per row group, as
   ``datasets`` writes image columns) in the Pick-a-Pic v2 schema, plus a few of its other columns. Images are a
   few hundred real JPEGs (noise over smooth colour, 512-768 px, ~200 KB) with a row-specific suffix after the
   JPEG end marker, so no two rows' bytes are equal and generation is fast; 12% of the rows are ties.
2. Iterates the training dataset as the trainer does: ``PreferencePairs`` through a torch DataLoader with
   ``--workers`` worker processes, batches from ``EpochBatches`` in the dataset's block-window order, every image
   decoded, resized and cropped to ``--resolution``.
3. Samples the process tree (main + DataLoader workers) every ``--interval`` seconds from /proc: the sum of
   VmRSS, of RssAnon (heap: what the reader holds) and of PSS (shared pages split between processes). The page
   cache is not counted (files are read with positional reads, not mapped). Prints a line every ``--every``
   seconds and a JSON summary at the end.
4. With ``--old-gb``, the first files of the set (about that many GB) also go through the old path,
   ``datasets.load_dataset("parquet")``: its Arrow copy's disk use, the conversion time, and the same iteration
   (full random permutation) on both readers, for the same number of pairs.

The set is deleted at the end unless ``--keep`` (a kept set is reused when its manifest matches).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from diffalign.config import DataConfig
from diffalign.data import pairs as P
from diffalign.data.sampler import EpochBatches

GB = 1e9
SCHEMA = pa.schema([("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
                    ("label_0", pa.float64()), ("label_1", pa.float64()), ("image_0_uid", pa.string()),
                    ("image_1_uid", pa.string()), ("model_0", pa.string()), ("model_1", pa.string()),
                    ("user_id", pa.int64())])


# ------------------------------------------------------------------------------------------- the set


def base_jpegs(n: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        side = int(rng.choice([512, 512, 768]))
        smooth = Image.fromarray(rng.integers(0, 256, (side // 16, side // 16, 3), dtype=np.uint8))
        pixels = np.asarray(smooth.resize((side, side), Image.BICUBIC)).astype(np.int16)
        pixels = pixels + rng.normal(0, 18, pixels.shape).astype(np.int16)
        buffer = io.BytesIO()
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        image.save(buffer, "JPEG", quality=int(rng.integers(80, 95)))
        out.append(buffer.getvalue())
    return out


def generate(out: Path, size_gb: float, file_mb: float, group_rows: int, seed: int = 0) -> dict[str, Any]:
    params = {"size_gb": size_gb, "file_mb": file_mb, "group_rows": group_rows, "seed": seed, "version": 1}
    manifest = out / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text())["params"] == params:
        return json.loads(manifest.read_text())
    shutil.rmtree(out, ignore_errors=True)
    (out / "data").mkdir(parents=True)
    jpegs = base_jpegs(300, seed)
    rng = np.random.default_rng(seed + 1)
    per_row = 2 * np.mean([len(j) for j in jpegs]) + 200
    rows_per_file = max(group_rows, int(file_mb * 1e6 / per_row) // group_rows * group_rows)
    total_rows = int(size_gb * GB / per_row)
    files = (total_rows + rows_per_file - 1) // rows_per_file
    started, row, written = time.perf_counter(), 0, 0
    for k in range(files):
        path = out / "data" / f"train-{k:05d}-of-{files:05d}.parquet"
        with pq.ParquetWriter(path, SCHEMA) as writer:
            for lo in range(row, min(row + rows_per_file, total_rows), group_rows):
                n = min(group_rows, total_rows - lo)
                writer.write_table(_group(lo, n, jpegs, rng), row_group_size=group_rows)
        row = min(row + rows_per_file, total_rows)
        written += path.stat().st_size
        print(f"  wrote {path.name}: {row} rows, {written / GB:.2f} GB, {time.perf_counter() - started:.0f} s",
              flush=True)
    info = {"params": params, "rows": total_rows, "files": files, "bytes": written, "rows_per_file": rows_per_file,
            "seconds": time.perf_counter() - started}
    manifest.write_text(json.dumps(info, indent=2))
    return info


def _group(lo: int, n: int, jpegs: list[bytes], rng: np.random.Generator) -> pa.Table:
    pick = rng.integers(0, len(jpegs), (n, 2))
    labels = rng.choice([1.0, 0.0, 0.5], n, p=[0.44, 0.44, 0.12])
    rows = range(lo, lo + n)
    # JPEG decoders stop at the end marker (FFD9): the suffix makes every row's bytes distinct, not its pixels
    image = lambda i, side: jpegs[pick[i - lo, side]] + f"row {i:012d} image {side}".encode()  # noqa: E731
    return pa.table({
        "caption": [f"a detailed painting of prompt {i // 3} in the style of artist {i % 97}, trending" for i in rows],
        "jpg_0": [image(i, 0) for i in rows], "jpg_1": [image(i, 1) for i in rows],
        "label_0": labels, "label_1": 1 - labels,
        "image_0_uid": [f"{i:08d}-0000-4000-8000-{0:012d}" for i in rows],
        "image_1_uid": [f"{i:08d}-0000-4000-8000-{1:012d}" for i in rows],
        "model_0": ["sdxl"] * n, "model_1": ["sd-2.1"] * n, "user_id": rng.integers(0, 10_000, n),
    }, schema=SCHEMA)


# ------------------------------------------------------------------------------------------- /proc


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return out


def _status(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, RssShmem, VmHWM (bytes) and Pss from smaps_rollup."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                    out[key] = int(value.split()[0]) * 1024
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    out["Pss"] = int(line.split()[1]) * 1024
    except OSError:
        return {}
    return out


class TreeMemory(threading.Thread):
    """Samples this process and its descendants; keeps the peaks of the sums and each process's VmHWM."""

    KEYS = ("VmRSS", "RssAnon", "RssShmem", "Pss")

    def __init__(self, interval: float) -> None:
        super().__init__(daemon=True)
        self.interval, self.stop = interval, threading.Event()
        self.now = dict.fromkeys(self.KEYS, 0)
        self.peak = dict.fromkeys(self.KEYS, 0)
        self.hwm: dict[int, int] = {}
        self.per_process: dict[int, dict[str, int]] = {}      # each process's own peaks
        self.processes = 0

    def sample(self) -> None:
        sums = dict.fromkeys(self.KEYS, 0)
        pids = _tree(os.getpid())
        for pid in pids:
            status = _status(pid)
            for key in self.KEYS:
                sums[key] += status.get(key, 0)
            if "VmHWM" in status:
                self.hwm[pid] = max(self.hwm.get(pid, 0), status["VmHWM"])
                own = self.per_process.setdefault(pid, dict.fromkeys(self.KEYS, 0))
                for key in self.KEYS:
                    own[key] = max(own[key], status.get(key, 0))
        self.now, self.processes = sums, max(self.processes, len(pids))
        self.peak = {k: max(self.peak[k], sums[k]) for k in self.KEYS}

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            self.sample()


def gb(x: float) -> str:
    return f"{x / GB:.2f} GB"


# ------------------------------------------------------------------------------------------- iterate


def iterate(ds: P.PreferencePairs, args: argparse.Namespace, label: str, block_order: bool = True,
            max_pairs: int | None = None, seconds: float | None = None) -> dict[str, Any]:
    """Read batches as the trainer does and report memory and speed."""
    order = ds.epoch_order if block_order else None
    batches = EpochBatches(len(ds), args.batch, seed=0, epoch=0, order=order)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, collate_fn=ds.collate, num_workers=args.workers,
                                         persistent_workers=False)
    memory = TreeMemory(args.interval)
    memory.sample()
    before = dict(memory.now)
    memory.start()
    started = last = time.perf_counter()
    pairs = 0
    for batch in loader:
        pairs += batch["indices"].numel() + batch["num_skipped"]
        now = time.perf_counter()
        if now - last >= args.every:
            last = now
            print(f"  [{label}] {now - started:6.0f} s  {pairs:7d} pairs ({pairs / len(ds):5.1%} of the set, "
                  f"{pairs / (now - started):5.1f} pairs/s)  tree RSS {gb(memory.now['VmRSS'])} (anon "
                  f"{gb(memory.now['RssAnon'])}, shm {gb(memory.now['RssShmem'])}) PSS {gb(memory.now['Pss'])} | "
                  f"peak RSS {gb(memory.peak['VmRSS'])}, anon {gb(memory.peak['RssAnon'])}, PSS "
                  f"{gb(memory.peak['Pss'])}", flush=True)
        if (max_pairs and pairs >= max_pairs) or (seconds and now - started >= seconds):
            break
    elapsed = time.perf_counter() - started
    memory.sample()
    memory.stop.set()
    del loader
    main_pid = os.getpid()
    per = {("main" if pid == main_pid else f"worker {pid}"): own for pid, own in memory.per_process.items()}
    result = {"label": label, "pairs": pairs, "of": len(ds), "fraction": pairs / len(ds), "seconds": elapsed,
              "pairs_per_s": pairs / elapsed, "processes": memory.processes,
              "before": before, "peak": memory.peak, "peak_process_hwm": max(memory.hwm.values()),
              "per_process_peaks": per}
    for name, own in per.items():
        print(f"  [{label}] {name}: peak RSS {gb(own['VmRSS'])}, anon {gb(own['RssAnon'])}, PSS {gb(own['Pss'])}",
              flush=True)
    print(f"  [{label}] done: {pairs} pairs ({pairs / len(ds):.1%}) in {elapsed:.0f} s = {pairs / elapsed:.1f} pairs/s;"
          f" peak tree RSS {gb(memory.peak['VmRSS'])} (anon {gb(memory.peak['RssAnon'])}, shm "
          f"{gb(memory.peak['RssShmem'])}), peak PSS {gb(memory.peak['Pss'])}, largest single-process peak "
          f"{gb(result['peak_process_hwm'])}; before reading: RSS {gb(before['VmRSS'])}", flush=True)
    return result


def data_cfg(path: Path | str, args: argparse.Namespace) -> DataConfig:
    return DataConfig(path=str(path), resolution=args.resolution, shuffle_window=args.window,
                      num_workers=args.workers)


def compare_old(out: Path, info: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The first files of the set through datasets (its Arrow copy) and through the new reader."""
    import datasets

    files = sorted((out / "data").glob("*.parquet"))
    subset = files[:max(1, round(args.old_gb * GB / (info["bytes"] / info["files"])))]
    folder = out / "subset"
    folder.mkdir(exist_ok=True)
    for f in subset:
        (folder / f.name).unlink(missing_ok=True)
        (folder / f.name).symlink_to(f)
    cache = out / "hf_cache"
    shutil.rmtree(cache, ignore_errors=True)
    datasets.config.HF_DATASETS_CACHE = str(cache)
    memory = TreeMemory(args.interval)
    memory.start()
    started = time.perf_counter()
    table = datasets.load_dataset("parquet", data_files=[str(f) for f in subset], split="train",
                                  cache_dir=str(cache))
    convert = time.perf_counter() - started
    memory.sample()
    memory.stop.set()
    disk = int(subprocess.run(["du", "-sb", str(cache)], capture_output=True, text=True).stdout.split()[0])
    size = sum(f.stat().st_size for f in subset)
    print(f"  [old] datasets.load_dataset converted {len(subset)} file(s), {gb(size)}, in {convert:.0f} s: "
          f"an Arrow copy of {gb(disk)} in {cache}; conversion peak tree RSS {gb(memory.peak['VmRSS'])}", flush=True)
    old = P.PreferencePairs(data_cfg(folder, args))                   # the new reader on the subset ...
    old._source, old.stats = P._open_table(table, old.cfg)            # ... swapped for the old one
    n = min(args.compare_pairs, len(old))
    results = {"files": len(subset), "bytes": size, "arrow_copy_bytes": disk, "convert_seconds": convert,
               "convert_peak_rss": memory.peak["VmRSS"]}
    results["old"] = iterate(old, args, "old, full permutation", block_order=False, max_pairs=n)
    del old, table
    new = P.PreferencePairs(data_cfg(folder, args))
    results["new"] = iterate(new, args, "new, same subset", max_pairs=n)
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/work/exp15/pickapic-20g"))
    parser.add_argument("--size-gb", type=float, default=20.0)
    parser.add_argument("--file-mb", type=float, default=500.0, help="Pick-a-Pic v2's shards are ~500 MB")
    parser.add_argument("--group-rows", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--window", type=int, default=16, help="data.shuffle_window")
    parser.add_argument("--max-pairs", type=int, default=None, help="stop after this many pairs (default: all)")
    parser.add_argument("--seconds", type=float, default=None, help="stop after this long (default: no limit)")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between /proc samples")
    parser.add_argument("--every", type=float, default=60.0, help="seconds between printed lines")
    parser.add_argument("--old-gb", type=float, default=0.0, help="also compare the datasets path on ~this many GB")
    parser.add_argument("--compare-pairs", type=int, default=3000)
    parser.add_argument("--skip-full", action="store_true", help="only the --old-gb comparison")
    parser.add_argument("--keep", action="store_true", help="keep the generated set")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    print(f"generating {args.size_gb} GB in {args.out} ...", flush=True)
    info = generate(args.out, args.size_gb, args.file_mb, args.group_rows)
    print(f"set: {info['files']} files, {info['rows']} rows, {gb(info['bytes'])}, {args.group_rows} rows per row group "
          f"({info['seconds']:.0f} s to write)", flush=True)
    summary: dict[str, Any] = {"set": info, "args": {k: str(v) for k, v in vars(args).items()}}
    try:
        if args.old_gb:
            summary["compare"] = compare_old(args.out, info, args)
        if not args.skip_full:
            started = time.perf_counter()
            ds = P.PreferencePairs(data_cfg(args.out / "data", args))
            source = ds._source
            bound = args.workers * max(args.window, 1) * source.group_bytes
            print(f"opened in {time.perf_counter() - started:.1f} s: {len(ds)} pairs, {source.group_start.size} row "
                  f"groups, largest {gb(source.group_bytes)} of images; bound on held row groups: {args.workers} "
                  f"workers x {max(args.window, 1)} x that = {gb(bound)}", flush=True)
            summary["open_seconds"], summary["held_bound"] = time.perf_counter() - started, bound
            summary["full"] = iterate(ds, args, "new, whole set", max_pairs=args.max_pairs, seconds=args.seconds)
    finally:
        text = json.dumps(summary, indent=2, default=str)
        results = args.out.parent / f"{args.out.name}-results.json"
        results.write_text(text)
        print(text)
        if not args.keep:
            shutil.rmtree(args.out, ignore_errors=True)
            print(f"deleted {args.out}")


if __name__ == "__main__":
    main()
