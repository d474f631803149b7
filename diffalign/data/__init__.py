"""Preference-pair data: sources (Pick-a-Pic parquet, jsonl), deterministic transforms, the latent cache."""

from __future__ import annotations

from typing import Any


def open_training_data(cfg: Any, model: Any = None) -> Any:
    """The dataset a run trains on: the latent cache when ``data.cache_dir`` is set, else decoded pairs.

    Every dataset has ``__len__``, ``set_epoch(epoch)`` and ``collate(items)``.
    """
    if cfg.data.cache_dir:
        from diffalign.data.cache import CachedPairs

        return CachedPairs(cfg)
    from diffalign.data.pairs import PreferencePairs

    return PreferencePairs(cfg.data, seed=cfg.train.seed)
