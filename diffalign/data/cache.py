"""Latent and text cache: every image VAE-encoded once, every unique prompt text-encoded once.

Layout of ``data.cache_dir``::

    manifest.json             what was cached (model, data and transform settings) and the shard list
    pairs-00000.safetensors   latent_mean / latent_std [N,2,C,h,w] (winner, loser), original_sizes and
                              crops [N,2,2], prompt_id [N], row [N]
    prompts-00000.safetensors one tensor per Cond field (hidden [P,L,D], pooled [P,D']); prompt 0 is ""

The VAE distribution's mean and std are stored, not a sample, so x0 = mean + std * eps stays stochastic.
Augmentation is frozen at cache time: each pair keeps the crop and flip drawn for epoch 0 for the whole run
(so with a cache, ``data.hflip`` flips a fixed half of the pairs rather than re-drawing each epoch).
The cache is written to a temporary folder and renamed when complete. Training refuses a cache whose
manifest does not match the configuration and names the settings that differ.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from diffalign.checkpoint import write_atomic
from diffalign.config import Config, to_dict
from diffalign.data.pairs import PreferencePairs, collate_pairs, item_rng
from diffalign.models.base import DTYPES, DiffusionModel

log = logging.getLogger("diffalign")

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SHARD_PAIRS = 1024
TRANSFORM_KEYS = ("path", "format", "split", "resolution", "crop", "hflip", "paired_transforms", "ties",
                  "on_bad_image", "max_pairs", "cache_dtype")


class CacheError(ValueError):
    """The cache is missing, incomplete or was built with other settings."""


def cache_key(cfg: Config) -> dict[str, Any]:
    """The settings a cache depends on; any difference makes it stale."""
    model = to_dict(cfg.model)
    data = {k: getattr(cfg.data, k) for k in TRANSFORM_KEYS}
    return {"format_version": FORMAT_VERSION, "model": model, "data": data, "seed": cfg.train.seed}


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: cache has {va!r}, config has {vb!r}")
    return out


def read_manifest(cache_dir: str | Path, cfg: Config) -> dict[str, Any]:
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise CacheError(f"data.cache_dir={cache_dir}: no {MANIFEST}; build it with `diffalign cache CONFIG`")
    manifest = json.loads(path.read_text())
    stale = _diff(manifest["key"], cache_key(cfg))
    if stale:
        raise CacheError(f"data.cache_dir={cache_dir} is stale (built with other settings):\n  "
                         + "\n  ".join(stale) + "\nrebuild it with `diffalign cache CONFIG`")
    return manifest


# ------------------------------------------------------------------------------------------- writing


def _encode_prompts(model: DiffusionModel, prompts: list[str], dtype: torch.dtype, batch: int = 64) -> dict:
    chunks: dict[str, list[torch.Tensor]] = {}
    for lo in tqdm(range(0, len(prompts), batch), desc="prompts", leave=False):
        cond = model.encode_prompt(prompts[lo: lo + batch])
        for key, value in cond.tensors().items():
            if value is not None:
                chunks.setdefault(key, []).append(value.to("cpu", dtype))
    return {key: torch.cat(values).contiguous() for key, values in chunks.items()}


def _as_pairs(x: torch.Tensor, n: int) -> torch.Tensor:
    """[w_1..w_N, l_1..l_N] stacked on axis 0 -> [N, 2, ...] (winner, loser) per pair."""
    return x.reshape(2, n, *x.shape[1:]).transpose(0, 1).contiguous()


def _encode_pairs(model: DiffusionModel, data: PreferencePairs, prompt_ids: dict[str, int], cfg: Config,
                  directory: Path) -> tuple[list[dict], int]:
    dtype = DTYPES[cfg.data.cache_dtype]
    loader = torch.utils.data.DataLoader(data, batch_size=SHARD_PAIRS, collate_fn=collate_pairs,
                                         num_workers=cfg.data.num_workers)
    shards, skipped = [], 0
    for k, batch in enumerate(tqdm(loader, desc="cache pairs")):
        skipped += batch["num_skipped"]
        mean, std = [], []
        for lo in range(0, batch["pixels"].shape[0], 16):     # VAE in chunks of 16 images
            m, s = model.encode_images(batch["pixels"][lo: lo + 16])
            mean.append(m.cpu())
            std.append(s.cpu())
        n = len(batch["prompts"])
        tensors = {
            "latent_mean": _as_pairs(torch.cat(mean), n).to(dtype),
            "latent_std": _as_pairs(torch.cat(std), n).to(dtype),
            "original_sizes": _as_pairs(batch["original_sizes"], n), "crops": _as_pairs(batch["crops"], n),
            "prompt_id": torch.tensor([prompt_ids[p] for p in batch["prompts"]]),
            "row": batch["rows"].long(),
        }
        name = f"pairs-{k:05d}.safetensors"
        save_file(tensors, directory / name)
        shards.append({"file": name, "count": n})
    return shards, skipped


def build_cache(cfg: Config, model: DiffusionModel) -> Path:
    """Encode the configured pairs into ``cfg.data.cache_dir``; returns the folder. Up-to-date caches are kept."""
    cache_dir = Path(cfg.data.cache_dir or "")
    if not cfg.data.cache_dir:
        raise CacheError("data.cache_dir is not set: say where the cache goes, e.g. data.cache_dir=cache/pickapic")
    try:
        read_manifest(cache_dir, cfg)
        log.info("cache at %s is up to date", cache_dir)
        return cache_dir
    except CacheError:
        pass
    data = PreferencePairs(cfg.data, seed=cfg.train.seed, caption_dropout=0.0)
    data.set_epoch(0)
    prompts = [""] + sorted({data.prompt(i) for i in range(len(data))} - {""})
    prompt_ids = {p: i for i, p in enumerate(prompts)}

    def fill(tmp: Path) -> None:
        shards, skipped = _encode_pairs(model, data, prompt_ids, cfg, tmp)
        save_file(_encode_prompts(model, prompts, DTYPES[cfg.data.cache_dtype]), tmp / "prompts-00000.safetensors")
        manifest = {"key": cache_key(cfg), "num_pairs": sum(s["count"] for s in shards), "pair_shards": shards,
                    "prompt_shards": ["prompts-00000.safetensors"], "num_prompts": len(prompts),
                    "skipped_pairs": skipped, "stats": data.stats}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))

    write_atomic(cache_dir, fill)
    log.info("cached %d pairs and %d prompts in %s", len(data), len(prompts), cache_dir)
    return cache_dir


# ------------------------------------------------------------------------------------------- reading


class CachedPairs(torch.utils.data.Dataset):
    """Pairs from a cache: items hold latent mean/std and the prompt's conditioning tensors."""

    def __init__(self, cfg: Config) -> None:
        self.dir = Path(cfg.data.cache_dir)
        self.manifest = read_manifest(self.dir, cfg)
        self.seed, self.epoch, self.caption_dropout = cfg.train.seed, 0, cfg.data.caption_dropout
        self.index = [(s["file"], j) for s in self.manifest["pair_shards"] for j in range(s["count"])]
        if cfg.data.max_pairs is not None:
            self.index = self.index[: cfg.data.max_pairs]
        self._handles: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.index)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _open(self, name: str) -> Any:
        if name not in self._handles:
            self._handles[name] = safe_open(str(self.dir / name), framework="pt")
        return self._handles[name]

    def __getitem__(self, i: int) -> dict[str, Any]:
        name, j = self.index[i]
        shard = self._open(name)
        item = {k: shard.get_slice(k)[j] for k in ("latent_mean", "latent_std", "original_sizes", "crops")}
        prompt_id = int(shard.get_slice("prompt_id")[j])
        row = int(shard.get_slice("row")[j])
        # the same first draw as PreferencePairs, so cached and uncached runs drop the same captions
        if self.caption_dropout and item_rng(self.seed, self.epoch, row).random() < self.caption_dropout:
            prompt_id = 0
        prompts = self._open(self.manifest["prompt_shards"][0])
        item["cond"] = {k: prompts.get_slice(k)[prompt_id] for k in prompts.keys()}
        item["index"] = i
        return item

    @staticmethod
    def collate(items: list[dict]) -> dict[str, Any]:
        """Stack items; per-image tensors become [winners; losers] [2B,...] like the uncached path."""
        pairs = lambda key: torch.cat([torch.stack([it[key][0] for it in items]),
                                       torch.stack([it[key][1] for it in items])])
        batch = {k: pairs(k).float() for k in ("latent_mean", "latent_std")}
        batch.update({k: pairs(k) for k in ("original_sizes", "crops")})
        batch["cond"] = {k: torch.stack([it["cond"][k] for it in items]).float() for k in items[0]["cond"]}
        batch["indices"] = torch.tensor([it["index"] for it in items])
        batch["num_skipped"] = 0
        return batch
