"""AI feedback: score both images of every preference pair with a reward and keep or flip its label.

Writes ``OUT/pairs.jsonl`` in the project's jsonl format (prompt, chosen, rejected image paths relative to OUT)
with the images under ``OUT/images/``, so the result trains directly (``data.path=OUT/pairs.jsonl``). Each line
also records both scores and whether the label was flipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from diffalign.checkpoint import replacing
from diffalign.config import DataConfig
from diffalign.data.pairs import PreferencePairs
from diffalign.data.transforms import to_rgb, unit_pixels


@torch.no_grad()
def relabel(data: DataConfig, reward: Any, out: str | Path, margin: float = 0.0, device: str = "cpu") -> dict:
    """Score (winner, loser) of each pair; flip when the loser scores more than ``margin`` higher.

    Unreadable pairs follow ``data.on_bad_image`` (error, or skip the whole pair and count it). The jsonl is
    written to a temporary name and renamed when complete. Returns counts.
    """
    pairs = PreferencePairs(data, caption_dropout=0.0)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    counts = {"pairs": 0, "flipped": 0, "skipped": 0}
    with replacing(out / "pairs.jsonl") as tmp, tmp.open("w", encoding="utf-8") as f:
        for i in tqdm(range(len(pairs)), desc="relabel"):
            images = pairs.pair_images(i)
            if images is None:
                counts["skipped"] += 1
                continue
            prompt, row = pairs.prompt(i), pairs.row(i)
            scores = [reward(unit_pixels(im)[None].to(device), [prompt]).item() for im in images]
            flip = scores[1] > scores[0] + margin
            names = [f"images/{row}_{k}.png" for k in ("a", "b")]
            for image, name in zip(images, names, strict=True):
                to_rgb(image).save(out / name)
            chosen, rejected = (1, 0) if flip else (0, 1)
            f.write(json.dumps({"prompt": prompt, "chosen": names[chosen], "rejected": names[rejected],
                                "score_chosen": scores[chosen], "score_rejected": scores[rejected],
                                "flipped": flip, "source_row": row}) + "\n")
            counts["pairs"] += 1
            counts["flipped"] += int(flip)
    return counts
