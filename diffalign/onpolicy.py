"""On-policy preference pairs: sample the current model, score with a reward, keep each prompt's best and worst.

``diffalign pairs CONFIG --out DIR --samples N --reward SPEC`` samples N images per prompt of ``data.prompts``
(the base model, or ``--weights`` a LoRA / full fine-tune / run folder) with the evaluation's sampler settings
(``eval.num_steps``, ``eval.guidance_scale``, ``eval.scheduler``; prompt i, counted from 0, gets the seeds
``--seed + i * N`` .. ``--seed + (i + 1) * N - 1``, so a prompt listed twice gives two different pairs), scores
them with any reward (which receives the prompts' metadata from a jsonl prompt file), and writes
``DIR/train-00000.parquet`` in the Pick-a-Pic v2 schema (``caption``, ``jpg_0`` = the best image, ``jpg_1`` =
the worst, ``label_0`` = 1, plus both scores and seeds), which
Diffusion-DPO, MaPO and InPO train on as they are (``data.path=DIR``). Prompts whose best and worst scores differ
by no more than ``--margin`` give no pair and are counted. The file appears only when complete.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from diffalign.checkpoint import replacing
from diffalign.config import Config
from diffalign.data.prompts import read_prompt_records, read_prompts

log = logging.getLogger("diffalign")


def _png(array: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


@torch.no_grad()
def generate_pairs(cfg: Config, reward: Any, out: str | Path, samples: int, weights: str | None = None,
                   margin: float = 0.0, seed: int = 0) -> dict[str, int]:
    """Write the pairs file; returns {"prompts", "pairs", "ties"}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from diffalign.eval.checkpoints import applied, resolve
    from diffalign.eval.generate import to_uint8
    from diffalign.eval.sample import Sampler, sampling_dtype
    from diffalign.models import load_model

    if samples < 2:
        raise ValueError(f"--samples = {samples}: a pair needs at least 2 images per prompt")
    prompts, metadata = read_prompt_records(cfg.data.prompts)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(cfg.model, device, sampling_dtype(cfg.eval.dtype))
    sampler = Sampler(cfg, model)
    ckpt = resolve(weights, "--weights") if weights else None
    rows: dict[str, list] = {k: [] for k in ("caption", "jpg_0", "jpg_1", "label_0", "score_0", "score_1",
                                             "seed_0", "seed_1")}
    ties = 0
    with applied(model, ckpt):
        for i, (prompt, meta) in enumerate(tqdm(list(zip(prompts, metadata, strict=True)), desc="on-policy pairs",
                                                unit="prompt")):
            seeds = list(range(seed + i * samples, seed + (i + 1) * samples))
            images = torch.cat([sampler.images_for([prompt] * len(chunk), chunk)
                                for chunk in _chunks(seeds, cfg.eval.batch_size)])
            scores = reward(images.to(device), [prompt] * samples, [meta] * samples).float().cpu()
            best, worst = int(scores.argmax()), int(scores.argmin())
            if scores[best] - scores[worst] <= margin:
                ties += 1
                continue
            arrays = to_uint8(images[[best, worst]])
            for key, value in (("caption", prompt), ("jpg_0", _png(arrays[0])), ("jpg_1", _png(arrays[1])),
                               ("label_0", 1.0), ("score_0", float(scores[best])), ("score_1", float(scores[worst])),
                               ("seed_0", seeds[best]), ("seed_1", seeds[worst])):
                rows[key].append(value)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with replacing(out / "train-00000.parquet") as tmp:
        pq.write_table(pa.table(rows), tmp)
    counts = {"prompts": len(prompts), "pairs": len(rows["caption"]), "ties": ties}
    log.info("%d prompts -> %d pairs (%d without a margin) in %s", *counts.values(), out)
    return counts


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def iterate(cfg: Config, reward: Any, samples: int, iterations: int, margin: float = 0.0) -> list[Path]:
    """Online (iterative) DPO: ``iterations`` rounds of on-policy pairs from the latest model, then a run of the
    configured pair method on them, each round's LoRA starting from the previous one (``lora.init_from``; the
    reference stays the base model). Round k lives in ``output_dir/round-k`` (pairs/ and the run); returns the
    final weights of every round."""
    from diffalign.config import build_config, to_dict
    from diffalign.trainer import train

    if iterations < 1:
        raise ValueError(f"--iterations = {iterations} must be at least 1")
    root, finals, previous = Path(cfg.output_dir), [], None
    per_round = samples * len(read_prompts(cfg.data.prompts))       # fresh seeds in every round
    for k in range(1, iterations + 1):
        folder = root / f"round-{k}"
        raw = to_dict(cfg)
        raw["data"].update(path=str(folder / "pairs"), format="pickapic")
        raw["lora"]["init_from"] = str(previous) if previous else cfg.lora.init_from
        raw["output_dir"], raw["name"] = str(folder), f"{cfg.name}-round-{k}"
        round_cfg = build_config(raw, f"<round {k}>")
        generate_pairs(round_cfg, reward, folder / "pairs", samples,
                       weights=str(previous) if previous else None, margin=margin, seed=(k - 1) * per_round)
        previous = train(round_cfg)
        finals.append(previous)
        log.info("round %d of %d: %s", k, iterations, previous)
    return finals
