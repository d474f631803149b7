"""Paired win rates and means with cluster-bootstrap confidence intervals.

Scores come in pairs (base and tuned image for the same prompt and seed). Several seeds of one prompt are
correlated, so the intervals resample whole groups (prompts) with replacement, not single pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# Upper bound on the number of indices drawn at once, so large group counts keep memory bounded (~32 MiB).
_MAX_DRAW = 1 << 22


def _scores(values: Any, name: str) -> np.ndarray:
    """``values`` as a non-empty, finite 1-D float array; ``name`` is used in error messages."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty; need at least one score")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(f"{name} has {bad.size} non-finite score(s) (NaN or inf); first at index {bad[0]}")
    return arr


def _group_ids(groups: Sequence[int] | np.ndarray | None, n: int) -> np.ndarray:
    """Dense group ids 0..G-1 for each of ``n`` items; None puts every item in its own group."""
    if groups is None:
        return np.arange(n)
    arr = np.asarray(groups)
    if arr.ndim != 1 or arr.size != n:
        raise ValueError(f"groups must be 1-D with one entry per pair ({n}), got shape {arr.shape}")
    return np.unique(arr, return_inverse=True)[1].reshape(-1)


def _check_options(num_resamples: int, confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be >= 1, got {num_resamples}")


def _bootstrap_ratio_ci(
    values: np.ndarray, group_ids: np.ndarray, num_resamples: int, confidence: float, seed: int
) -> list[float]:
    """Percentile interval of sum(values) / count over resamples of whole groups with replacement.

    Per-group sums and counts are computed once; each resample is then one row of a
    ``[num_resamples, n_groups]`` index matrix (drawn in row blocks to bound memory).
    """
    sums = np.bincount(group_ids, weights=values)
    counts = np.bincount(group_ids).astype(np.float64)
    n_groups = sums.size
    rng = np.random.default_rng(seed)
    block = max(1, _MAX_DRAW // n_groups)
    stats = np.empty(num_resamples)
    for start in range(0, num_resamples, block):
        stop = min(start + block, num_resamples)
        idx = rng.integers(0, n_groups, size=(stop - start, n_groups))
        stats[start:stop] = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    alpha = 1.0 - confidence
    lo, hi = np.quantile(stats, [alpha / 2, 1.0 - alpha / 2])
    return [float(lo), float(hi)]


def win_rate(
    base: Any,
    tuned: Any,
    groups: Sequence[int] | np.ndarray | None = None,
    num_resamples: int = 10000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """How often ``tuned`` beats ``base`` on paired scores, with a cluster-bootstrap interval.

    A win is ``tuned > base``, a loss ``tuned < base``; a tie counts as half a win, so
    ``win_rate = (wins + 0.5 * ties) / n``. ``groups[i]`` is the cluster (prompt) of pair ``i``;
    None treats every pair as independent.

    Returns ``{"win_rate", "ci": [lo, hi], "wins", "losses", "ties", "n"}`` with plain Python numbers.
    """
    _check_options(num_resamples, confidence)
    base_arr = _scores(base, "base")
    tuned_arr = _scores(tuned, "tuned")
    if base_arr.size != tuned_arr.size:
        raise ValueError(f"base and tuned must be paired: got {base_arr.size} and {tuned_arr.size} scores")
    n = base_arr.size
    group_ids = _group_ids(groups, n)
    won, lost = tuned_arr > base_arr, tuned_arr < base_arr
    credit = won + 0.5 * ~(won | lost)
    wins, losses = int(won.sum()), int(lost.sum())
    ties = n - wins - losses
    return {
        "win_rate": (wins + 0.5 * ties) / n,
        "ci": _bootstrap_ratio_ci(credit, group_ids, num_resamples, confidence, seed),
        "wins": wins,
        "losses": losses,
        "ties": ties,
        "n": n,
    }


def mean_ci(
    scores: Any,
    groups: Sequence[int] | np.ndarray | None = None,
    num_resamples: int = 10000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Mean of ``scores`` with a cluster-bootstrap interval (groups as in :func:`win_rate`).

    The bootstrap works on deviations from the first score, which keeps sums small and makes a
    constant array give exactly ``[c, c]``.

    Returns ``{"mean", "ci": [lo, hi], "n"}`` with plain Python numbers.
    """
    _check_options(num_resamples, confidence)
    arr = _scores(scores, "scores")
    group_ids = _group_ids(groups, arr.size)
    ref = arr[0]
    deviations = arr - ref
    lo, hi = _bootstrap_ratio_ci(deviations, group_ids, num_resamples, confidence, seed)
    return {"mean": float(ref + deviations.mean()), "ci": [float(ref + lo), float(ref + hi)], "n": int(arr.size)}
