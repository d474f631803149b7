"""Precomputed reference errors: the diffusion analogue of trl's ``precompute_ref_log_probs``.

Diffusion-DPO's reference term is the frozen model's denoising error on each pair at that step's (x0, t,
noise). When every pair's draws come from its own seed (``methods.dpo.seeded_pairs``, seeded by
(train.seed, epoch, pair index)), those errors are known before training: ``diffalign cache CONFIG
data.reference_epochs=E`` computes them for E epochs, forward only, ``data.cache_batch_size`` pairs at a time,
with the base model (which LoRA and full fine-tuning both start from), and training with
``method.reference=precomputed`` reads them instead of running the reference, so it needs no reference forward and,
for full fine-tuning, no frozen copy of the denoiser. Stored next to the latent cache:

    reference_errors.safetensors   errors [E, N, 2] (winner, loser) float32
    reference.json                 what they depend on (model, seed, precision, timestep sampling, caption
                                   dropout, the cache), the epoch count and the file's size and CRC-32
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from diffalign.checkpoint import crc32, write_text_atomic
from diffalign.config import Config, to_dict
from diffalign.data.pairs import DataError
from diffalign.data.sampler import example_seeds
from diffalign.options import parse_dtype

log = logging.getLogger("diffalign")

ERRORS_FILE = "reference_errors.safetensors"
META_FILE = "reference.json"


def reference_key(cfg: Config, num_pairs: int) -> dict[str, Any]:
    """What the precomputed errors depend on; a difference makes them stale."""
    return {"model": to_dict(cfg.model), "seed": cfg.train.seed, "mixed_precision": cfg.train.mixed_precision,
            "timestep_sampling": cfg.train.timestep_sampling, "caption_dropout": cfg.data.caption_dropout,
            "num_pairs": num_pairs}


def read_reference(cfg: Config, num_pairs: int) -> tuple[torch.Tensor, int]:
    """(errors [E, N, 2], E) for this configuration, or DataError saying what is missing or stale."""
    folder = Path(cfg.data.cache_dir or "")
    meta_path, path = folder / META_FILE, folder / ERRORS_FILE
    build = "build them with `diffalign cache CONFIG data.reference_epochs=E`"
    if not meta_path.is_file() or not path.is_file():
        raise DataError(f"{folder}: no precomputed reference errors for method.reference=precomputed; {build}")
    meta = json.loads(meta_path.read_text())
    key = reference_key(cfg, num_pairs)
    stale = sorted(k for k in key if meta.get("key", {}).get(k) != key[k])
    if stale:
        raise DataError(f"{path}: the reference errors were computed with other settings ({', '.join(stale)}); {build}")
    if path.stat().st_size != meta["size"] or crc32(path) != meta["crc32"]:
        raise DataError(f"{path}: damaged (size or CRC-32 differs from {meta_path}); {build}")
    return load_file(str(path))["errors"], int(meta["epochs"])


def build_reference_errors(cfg: Config) -> Path:
    """Compute the errors for data.reference_epochs epochs into data.cache_dir (the latent cache must exist)."""
    from diffalign.data.cache import CachedPairs
    from diffalign.methods.dpo import pair_errors, seeded_pairs
    from diffalign.models import load_model

    epochs, folder = cfg.data.reference_epochs, Path(cfg.data.cache_dir)
    data = CachedPairs(cfg, with_reference=False)
    n = len(data)
    try:
        _, have = read_reference(cfg, n)
        if have >= epochs:
            log.info("reference errors in %s are up to date (%d epochs)", folder, have)
            return folder / ERRORS_FILE
    except DataError:
        pass
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = parse_dtype(cfg.train.mixed_precision)
    model = load_model(cfg.model, device, dtype)
    model.schedule.use_timestep_sampling(cfg.train.timestep_sampling)
    model.denoiser.eval()
    autocast = (torch.autocast(device_type=model.device.type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())
    errors = torch.zeros(epochs, n, 2)
    step = cfg.data.cache_batch_size
    with tqdm(total=epochs * n, desc="reference errors", unit="pair") as bar, torch.no_grad(), autocast:
        for epoch in range(epochs):
            data.set_epoch(epoch)
            for lo in range(0, n, step):
                indices = list(range(lo, min(n, lo + step)))
                batch = data.collate([data[i] for i in indices])
                batch["seeds"] = example_seeds(cfg.train.seed, epoch, n, indices)
                pn, cond = seeded_pairs(model, batch)
                err_w, err_l = pair_errors(model, pn, cond)
                errors[epoch, lo: lo + len(indices)] = torch.stack([err_w, err_l], dim=1).float().cpu()
                bar.update(len(indices))
    tmp = folder / f".tmp-{ERRORS_FILE}"
    save_file({"errors": errors.contiguous()}, str(tmp))
    os.replace(tmp, folder / ERRORS_FILE)
    path = folder / ERRORS_FILE
    write_text_atomic(folder / META_FILE, json.dumps({"key": reference_key(cfg, n), "epochs": epochs,
                                                      "size": path.stat().st_size, "crc32": crc32(path)}, indent=2))
    log.info("reference errors of %d pairs x %d epochs in %s", n, epochs, path)
    return path
