"""Latent and text cache: every image VAE-encoded once, every unique prompt text-encoded once.

Layout of ``data.cache_dir``::

    manifest.json             what was cached (model, data and transform settings), a fingerprint of the
                              source data, and every shard with its size and CRC-32 (checked on open)
    pairs-00000.safetensors   latent_mean / latent_std [N,2,C,h,w] (winner, loser), original_sizes and
                              crops [N,2,2], prompt_id [N], row [N]
    prompts-00000.safetensors one tensor per Cond field (hidden [P,L,D], pooled [P,D']); prompt 0 is ""

The VAE distribution's mean and std are stored, not a sample, so x0 = mean + std * eps stays stochastic.
Augmentation is frozen at cache time: each pair keeps the crop and flip drawn for epoch 0 for the whole run
(so with a cache, ``data.hflip`` flips a fixed half of the pairs rather than re-drawing each epoch).
Shard k holds pairs [S k, S (k + 1)) (S = ``data.cache_shard_pairs``, 1024); images are read and VAE-encoded
``data.cache_batch_size`` pairs at a time, on the accelerator, and under a multi-process launch each process
writes its own shards.
The cache is written to a temporary folder and renamed when complete. Training refuses a cache whose
manifest does not match the configuration or whose source data changed (jsonl content and image files,
parquet file sizes and times), and names what differs; a shard whose bytes changed (size and CRC-32 checked once
when training opens the cache) is named.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from diffalign.checkpoint import commit, crc32, temp_dir
from diffalign.config import Config, to_dict
from diffalign.data.batches import caption_dropped, winners_then_losers
from diffalign.data.pairs import DataError, PreferencePairs, collate_pairs, source_fingerprint
from diffalign.data.transforms import item_rng
from diffalign.models.base import DiffusionModel
from diffalign.options import parse_dtype
from diffalign.workers import Workers, launched

log = logging.getLogger("diffalign")

MANIFEST = "manifest.json"
FORMAT_VERSION = 2
TRANSFORM_KEYS = ("path", "format", "split", "resolution", "crop", "hflip", "paired_transforms", "ties",
                  "on_bad_image", "null_prompt", "outside_paths", "max_pairs", "cache_dtype", "cache_shard_pairs",
                  "min_score_margin")


class CacheError(DataError):
    """The cache is missing, incomplete, damaged or was built with other settings or other source data."""


def cache_key(cfg: Config) -> dict[str, Any]:
    """The settings a cache depends on; any difference makes it stale."""
    model = to_dict(cfg.model)
    data = {k: getattr(cfg.data, k) for k in TRANSFORM_KEYS}
    return {"format_version": FORMAT_VERSION, "model": model, "data": data, "seed": cfg.train.seed,
            "text_dtype": cfg.train.mixed_precision}


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
    try:
        manifest = json.loads(path.read_text())
    except ValueError as err:
        raise CacheError(f"{path}: not valid JSON ({err}); rebuild the cache with `diffalign cache CONFIG`") from None
    stale = _diff(manifest.get("key", {}), cache_key(cfg))
    if stale:
        raise CacheError(f"data.cache_dir={cache_dir} is stale (built with other settings):\n  "
                         + "\n  ".join(stale) + "\nrebuild it with `diffalign cache CONFIG`")
    changed = _diff(manifest.get("source", {}), source_fingerprint(cfg.data))
    if changed:
        raise CacheError(f"data.cache_dir={cache_dir} is stale: the source data changed since it was built:\n  "
                         + "\n  ".join(c.replace("config has", "now") for c in changed)
                         + "\nrebuild it with `diffalign cache CONFIG`")
    return manifest


# ------------------------------------------------------------------------------------------- writing


def _encode_prompts(model: DiffusionModel, prompts: list[str], dtype: torch.dtype, batch: int = 64) -> dict:
    chunks: dict[str, list[torch.Tensor]] = {}
    for lo in tqdm(range(0, len(prompts), batch), desc="cache prompts", leave=False):
        cond = model.encode_prompt(prompts[lo: lo + batch])
        for key, value in cond.tensors().items():
            if value is not None:
                chunks.setdefault(key, []).append(value.to("cpu", dtype))
    return {key: torch.cat(values).contiguous() for key, values in chunks.items()}


def _as_pairs(x: torch.Tensor, n: int) -> torch.Tensor:
    """[w_1..w_N, l_1..l_N] stacked on axis 0 -> [N, 2, ...] (winner, loser) per pair."""
    return x.reshape(2, n, *x.shape[1:]).transpose(0, 1).contiguous()


def _encode_batch(model: DiffusionModel, batch: dict, prompt_ids: dict[str, int], dtype: torch.dtype) -> dict:
    """One DataLoader batch of pairs -> its cache tensors ([n, 2, ...] per pair)."""
    n = len(batch["prompts"])
    mean, std = model.encode_images(batch["pixels"]) if n else (torch.zeros(0), torch.zeros(0))
    return {
        "latent_mean": _as_pairs(mean.cpu(), n).to(dtype), "latent_std": _as_pairs(std.cpu(), n).to(dtype),
        "original_sizes": _as_pairs(batch["original_sizes"], n), "crops": _as_pairs(batch["crops"], n),
        "prompt_id": torch.tensor([prompt_ids[p] for p in batch["prompts"]], dtype=torch.long),
        "row": batch["rows"].long(),
    }


def shard_ranges(num_pairs: int, size: int) -> list[range]:
    """Shard k holds the pairs [k * size, (k + 1) * size): fixed, whatever the process count."""
    return [range(lo, min(lo + size, num_pairs)) for lo in range(0, num_pairs, size)]


def _encode_shards(model: DiffusionModel, data: PreferencePairs, prompt_ids: dict[str, int], cfg: Config,
                   directory: Path, workers: Workers) -> None:
    """Write this process's shards (k = rank, rank + world, ...), reading data.cache_batch_size pairs at a time:
    host memory holds one shard's latents plus the loader's few prefetched batches, not a shard of pixels."""
    shards = shard_ranges(len(data), cfg.data.cache_shard_pairs)
    mine = [(k, r) for k, r in enumerate(shards) if k % workers.world == workers.rank]
    step = cfg.data.cache_batch_size
    order = [(k, list(r[lo: lo + step]), lo + step >= len(r)) for k, r in mine for lo in range(0, len(r), step)]
    loader = torch.utils.data.DataLoader(data, batch_sampler=[idx for _, idx, _ in order], collate_fn=collate_pairs,
                                         num_workers=cfg.data.num_workers)
    dtype, parts = parse_dtype(cfg.data.cache_dtype), []
    bar = tqdm(total=sum(len(r) for _, r in mine), desc="cache pairs", unit="pair", disable=not workers.is_main)
    for (k, idx, shard_done), batch in zip(order, loader, strict=True):
        parts.append(_encode_batch(model, batch, prompt_ids, dtype))
        bar.update(len(idx))
        if shard_done:
            save_file({key: torch.cat([p[key] for p in parts]) for key in parts[0]},
                      directory / f"pairs-{k:05d}.safetensors")
            parts = []
    bar.close()


def _shard_record(directory: Path, name: str) -> dict[str, Any]:
    with safe_open(str(directory / name), framework="pt") as f:
        count = f.get_slice("row").get_shape()[0] if name.startswith("pairs-") else None
    return {"file": name, "count": count, "size": (directory / name).stat().st_size, "crc32": crc32(directory / name)}


def _finish(model: DiffusionModel, data: PreferencePairs, prompts: list[str], cfg: Config, tmp: Path) -> None:
    """Main process, after every shard is written: the prompt shard and the manifest (written last)."""
    save_file(_encode_prompts(model, prompts, parse_dtype(cfg.data.cache_dtype)), tmp / "prompts-00000.safetensors")
    count = len(shard_ranges(len(data), cfg.data.cache_shard_pairs))
    shards = [_shard_record(tmp, f"pairs-{k:05d}.safetensors") for k in range(count)]
    num_pairs = sum(s["count"] for s in shards)
    manifest = {"key": cache_key(cfg), "source": source_fingerprint(cfg.data), "num_pairs": num_pairs,
                "pair_shards": shards, "prompt_shards": [_shard_record(tmp, "prompts-00000.safetensors")],
                "num_prompts": len(prompts), "skipped_pairs": len(data) - num_pairs, "stats": data.stats,
                "device": str(model.device)}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))


def build_cache(cfg: Config, model: DiffusionModel | None = None) -> Path:
    """Encode the configured pairs into ``cfg.data.cache_dir``; returns the folder. Up-to-date caches are kept.

    Without ``model``, only the encoders are loaded (no denoiser), on this process's accelerator, the text
    encoders in train.mixed_precision's dtype (as training loads them) and the VAE in model.vae_dtype. Under
    ``torchrun`` / ``accelerate launch`` every process encodes its own shards; the main one writes the rest.
    """
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
    with launched() as workers:
        if model is None:
            from diffalign.models import load_model

            model = load_model(cfg.model, workers.device, parse_dtype(cfg.train.mixed_precision), denoiser=False)
        tmp = cache_dir.with_name(f".tmp-{cache_dir.name}")
        if workers.is_main:
            temp_dir(cache_dir)
        workers.barrier()
        _encode_shards(model, data, prompt_ids, cfg, tmp, workers)
        workers.barrier()
        if workers.is_main:
            try:
                _finish(model, data, prompts, cfg, tmp)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            commit(tmp, cache_dir)
        workers.barrier()
    log.info("cached %d pairs and %d prompts in %s on %s", len(data), len(prompts), cache_dir, model.device)
    return cache_dir


# ------------------------------------------------------------------------------------------- reading


class CachedPairs(torch.utils.data.Dataset):
    """Pairs from a cache: items hold latent mean/std and the prompt's conditioning tensors."""

    def __init__(self, cfg: Config, with_reference: bool | None = None) -> None:
        """``with_reference`` (default: method.reference == "precomputed") adds each pair's precomputed reference
        errors for the current epoch as ``ref_errors`` [B, 2] (``data/reference.py``)."""
        self.dir = Path(cfg.data.cache_dir)
        self.manifest = read_manifest(self.dir, cfg)
        self.seed, self.epoch, self.caption_dropout = cfg.train.seed, 0, cfg.data.caption_dropout
        self.index = [(s["file"], j) for s in self.manifest["pair_shards"] for j in range(s["count"])]
        shards = self.manifest["pair_shards"] + self.manifest["prompt_shards"]
        self._records = {s["file"]: s for s in shards}
        if cfg.data.max_pairs is not None:
            self.index = self.index[: cfg.data.max_pairs]
        self._handles: dict[str, Any] = {}
        self._verify()
        if with_reference is None:
            with_reference = getattr(cfg.method, "reference", "online") == "precomputed"
        self.ref_errors, self.reference_epochs = None, None
        if with_reference:
            from diffalign.data.reference import read_reference

            self.ref_errors, self.reference_epochs = read_reference(cfg, len(self))

    def _verify(self) -> None:
        """Every shard's size and CRC-32 against the manifest, once when training opens the cache (not in each
        DataLoader worker every epoch); opening a shard later checks its size only."""
        total = sum(r.get("size", 0) for r in self._records.values())
        with tqdm(total=total, desc="verify cache", unit="B", unit_scale=True, leave=False) as bar:
            for name, record in self._records.items():
                path = self.dir / name
                if "crc32" in record and path.is_file() and crc32(path) != record["crc32"]:
                    raise CacheError(f"{path}: damaged cache shard (CRC-32 {crc32(path):08x}, the manifest has "
                                     f"{record['crc32']:08x}); rebuild the cache with `diffalign cache CONFIG`")
                self._check_size(path, record)
                bar.update(record.get("size", 0))

    @staticmethod
    def _check_size(path: Path, record: dict) -> None:
        size = path.stat().st_size if path.is_file() else None
        if size != record.get("size", size):
            found = "missing" if size is None else f"{size} bytes"
            raise CacheError(f"{path}: damaged cache shard ({found}; the manifest has {record.get('size')} bytes); "
                             "rebuild the cache with `diffalign cache CONFIG`")

    def __len__(self) -> int:
        return len(self.index)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _open(self, name: str) -> Any:
        """A shard's handle, opened (in each process) after its size still matches the manifest."""
        if name not in self._handles:
            path = self.dir / name
            self._check_size(path, self._records[name])
            self._handles[name] = safe_open(str(path), framework="pt")
        return self._handles[name]

    def __getitem__(self, i: int) -> dict[str, Any]:
        name, j = self.index[i]
        shard = self._open(name)
        item = {k: shard.get_slice(k)[j] for k in ("latent_mean", "latent_std", "original_sizes", "crops")}
        prompt_id = int(shard.get_slice("prompt_id")[j])
        row = int(shard.get_slice("row")[j])
        # the same first draw as PreferencePairs, so cached and uncached runs drop the same captions
        if self.caption_dropout and caption_dropped(item_rng(self.seed, self.epoch, row), self.caption_dropout):
            prompt_id = 0
        prompts = self._open(self.manifest["prompt_shards"][0]["file"])
        item["cond"] = {k: prompts.get_slice(k)[prompt_id] for k in prompts.keys()}
        item["index"] = i
        if self.ref_errors is not None:
            if self.epoch >= self.reference_epochs:
                raise DataError(f"{self.dir}: reference errors were precomputed for {self.reference_epochs} epochs "
                                f"and epoch {self.epoch} needs them; rebuild with a larger data.reference_epochs")
            item["ref_errors"] = self.ref_errors[self.epoch, i]
        return item

    @staticmethod
    def collate(items: list[dict]) -> dict[str, Any]:
        """Stack items; per-image tensors become [winners; losers] [2B,...] like the uncached path."""
        pairs = lambda key: winners_then_losers([it[key] for it in items])
        batch = {k: pairs(k).float() for k in ("latent_mean", "latent_std")}
        batch.update({k: pairs(k) for k in ("original_sizes", "crops")})
        batch["cond"] = {k: torch.stack([it["cond"][k] for it in items]).float() for k in items[0]["cond"]}
        batch["indices"] = torch.tensor([it["index"] for it in items])
        if "ref_errors" in items[0]:
            batch["ref_errors"] = torch.stack([it["ref_errors"] for it in items])
        batch["num_skipped"] = 0
        return batch
