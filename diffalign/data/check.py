"""``diffalign data check CONFIG``: read every pair of the configured set once, before a long run does.

Each pair's two images are decoded (in parallel DataLoader workers) exactly as training would decode them; the
report lists the rows that fail with the file or column at fault, the ties dropped, duplicates, the number of
distinct prompts and the image-size distribution (and how many images are smaller than ``data.resolution``, so
training would upscale them). Nothing is written unless ``--json`` names a file.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from diffalign.data.pairs import BadImageError, DataError, PreferencePairs


class _Reader(torch.utils.data.Dataset):
    """Pair i -> (i, [(w, h) of winner, loser] or None, error message or None)."""

    def __init__(self, pairs: PreferencePairs) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[int, list[tuple[int, int]] | None, str | None]:
        try:
            images = self.pairs._source.images(i)
        except BadImageError as err:
            return i, None, str(err)
        return i, [image.size for image in images], None


def check_pairs(data_cfg: Any, workers: int = 0, show: int = 20) -> dict[str, Any]:
    """The report as a dict: counts, failures (row, message), prompt count, size percentiles."""
    pairs = PreferencePairs(data_cfg, caption_dropout=0.0)
    loader = torch.utils.data.DataLoader(_Reader(pairs), batch_size=None, shuffle=False, num_workers=workers)
    failures, widths, heights = [], [], []
    for i, sizes, error in tqdm(loader, total=len(pairs), desc="reading pairs", unit="pair"):
        if error is not None:
            failures.append({"pair": int(i), "row": pairs.row(int(i)), "error": error})
            continue
        for w, h in sizes:
            widths.append(w)
            heights.append(h)
    prompts = {pairs.prompt(i) for i in range(len(pairs))}
    report: dict[str, Any] = {"path": str(data_cfg.path), **pairs.stats, "prompts": len(prompts),
                              "empty_prompts": int("" in prompts), "unreadable_pairs": len(failures),
                              "failures": failures[:show]}
    if widths:
        w, h = np.asarray(widths), np.asarray(heights)
        short = np.minimum(w, h)
        report["sizes"] = {
            "width": {q: int(np.percentile(w, p)) for q, p in (("min", 0), ("median", 50), ("max", 100))},
            "height": {q: int(np.percentile(h, p)) for q, p in (("min", 0), ("median", 50), ("max", 100))},
            "aspect_max": float(np.max(np.maximum(w, h) / short)),
            "below_resolution": int(np.sum(short < data_cfg.resolution)),
            "resolution": int(data_cfg.resolution),
        }
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{report['path']}: {report['rows']} rows, {report['pairs']} pairs used, "
             f"{report['ties_dropped']} ties dropped"
             + (f", {report['duplicates']} duplicate pairs" if "duplicates" in report else ""),
             f"  prompts: {report['prompts']} distinct" + (" (one is empty)" if report["empty_prompts"] else "")]
    sizes = report.get("sizes")
    if sizes:
        lines.append("  image sizes: width {min}-{max} (median {median})".format(**sizes["width"])
                     + ", height {min}-{max} (median {median})".format(**sizes["height"])
                     + f", longest/shortest side up to {sizes['aspect_max']:.2f}")
        lines.append(f"  {sizes['below_resolution']} images have a short side below data.resolution = "
                     f"{sizes['resolution']} (training upscales them)")
    bad = report["unreadable_pairs"]
    lines.append(f"  unreadable pairs: {bad}" + (":" if bad else ""))
    lines += [f"    pair {f['pair']} (row {f['row']}): {f['error']}" for f in report["failures"]]
    if bad > len(report["failures"]):
        lines.append(f"    ... and {bad - len(report['failures'])} more (--json writes the first --show)")
    return "\n".join(lines)


def run_check(cfg: Any, workers: int, json_path: str | None, show: int) -> int:
    """Print the report; 0 when every pair reads, 1 when some do not, 2 when the set cannot be opened."""
    try:
        report = check_pairs(cfg.data, workers, show)
    except DataError as err:
        print(f"error: {err}")
        return 2
    print(format_report(report))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
    return 1 if report["unreadable_pairs"] else 0
