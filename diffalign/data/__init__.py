"""Training data: preference pairs (Pick-a-Pic parquet, jsonl) with transforms and a latent cache; prompt lists."""

from __future__ import annotations

from typing import Any


def open_training_data(cfg: Any, model: Any = None) -> Any:
    """The dataset a run trains on: prompts for prompt-only methods; for pair methods the latent cache when
    ``data.cache_dir`` is set, else decoded pairs.

    Every dataset has ``__len__``, ``set_epoch(epoch)`` and ``collate(items)``.
    """
    if cfg.method.data == "prompts":
        from diffalign.data.prompts import PromptDataset

        return PromptDataset(cfg.data.prompts, cfg.data.resolution)
    if cfg.data.cache_dir:
        from diffalign.data.cache import CachedPairs

        return CachedPairs(cfg)
    from diffalign.data.pairs import PreferencePairs

    return PreferencePairs(cfg.data, seed=cfg.train.seed)
