"""Paired win rate and mean with cluster-bootstrap intervals (diffalign.eval.stats)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffalign.eval.stats import mean_ci, win_rate


def _pairs(n: int, wins: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` pairs of which the first ``wins`` are wins for tuned and the rest losses."""
    base = np.zeros(n)
    tuned = np.where(np.arange(n) < wins, 1.0, -1.0)
    return base, tuned


def _width(ci: list[float]) -> float:
    return ci[1] - ci[0]


def test_all_wins_losses_ties_are_exact():
    base = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert win_rate(base, base + 1) == {"win_rate": 1.0, "ci": [1.0, 1.0], "wins": 5, "losses": 0, "ties": 0, "n": 5}
    assert win_rate(base, base - 1) == {"win_rate": 0.0, "ci": [0.0, 0.0], "wins": 0, "losses": 5, "ties": 0, "n": 5}
    assert win_rate(base, base.copy()) == {
        "win_rate": 0.5,
        "ci": [0.5, 0.5],
        "wins": 0,
        "losses": 0,
        "ties": 5,
        "n": 5,
    }


def test_mixed_counts_and_interval():
    result = win_rate([0, 0, 0, 0], [1, 2, 3, -1])
    assert result["win_rate"] == 0.75
    assert (result["wins"], result["losses"], result["ties"], result["n"]) == (3, 1, 0, 4)
    lo, hi = result["ci"]
    assert lo <= 0.75 <= hi
    assert lo < hi


def test_ties_count_half():
    # 2 wins, 1 tie, 1 loss: (2 + 0.5) / 4
    result = win_rate([0.0, 0.0, 0.0, 0.0], [0.5, 0.1, 0.0, -0.2])
    assert result["win_rate"] == 0.625
    assert (result["wins"], result["losses"], result["ties"]) == (2, 1, 1)


def test_result_is_json_serialisable_plain_python():
    result = win_rate(np.zeros(6, dtype=np.float32), np.arange(6, dtype=np.float32) - 2, groups=[0, 0, 1, 1, 2, 2])
    assert json.loads(json.dumps(result)) == result
    assert all(type(result[k]) is int for k in ("wins", "losses", "ties", "n"))
    assert type(result["win_rate"]) is float and all(type(x) is float for x in result["ci"])
    stats = mean_ci(np.arange(5, dtype=np.float32))
    assert json.loads(json.dumps(stats)) == stats
    assert type(stats["mean"]) is float and type(stats["n"]) is int


def test_same_seed_same_interval_other_seed_differs():
    rng = np.random.default_rng(1)
    base, tuned = rng.normal(size=40), rng.normal(size=40)
    assert win_rate(base, tuned, seed=3)["ci"] == win_rate(base, tuned, seed=3)["ci"]
    assert mean_ci(tuned, seed=3)["ci"] == mean_ci(tuned, seed=3)["ci"]
    assert mean_ci(tuned, seed=3)["ci"] != mean_ci(tuned, seed=4)["ci"]


def test_interval_shrinks_with_more_pairs():
    small = win_rate(*_pairs(20, 12), num_resamples=2000)
    large = win_rate(*_pairs(2000, 1200), num_resamples=2000)
    assert small["win_rate"] == large["win_rate"] == 0.6
    assert _width(large["ci"]) < _width(small["ci"]) / 5
    assert large["ci"][0] > 0.5  # 1200 of 2000 is clearly above chance


def test_cluster_bootstrap_widens_interval_for_correlated_seeds():
    # 10 prompts x 5 seeds; all seeds of a prompt agree (6 prompts won, 4 lost).
    prompt_wins = np.repeat(np.arange(10) < 6, 5)
    base = np.zeros(50)
    tuned = np.where(prompt_wins, 1.0, -1.0)
    groups = np.repeat(np.arange(10), 5)
    independent = win_rate(base, tuned, num_resamples=4000)
    clustered = win_rate(base, tuned, groups=groups, num_resamples=4000)
    assert clustered["win_rate"] == independent["win_rate"] == 0.6
    assert _width(clustered["ci"]) > 1.5 * _width(independent["ci"])
    clustered_mean = mean_ci(tuned, groups=groups, num_resamples=4000)
    assert _width(clustered_mean["ci"]) > 1.5 * _width(mean_ci(tuned, num_resamples=4000)["ci"])


def test_groups_may_be_any_labels():
    base, tuned = _pairs(6, 4)
    by_int = win_rate(base, tuned, groups=[7, 7, 3, 3, 9, 9])
    by_dense = win_rate(base, tuned, groups=[1, 1, 0, 0, 2, 2])
    assert by_int == by_dense


def test_mean_of_constant_is_exact():
    assert mean_ci(np.full(13, 0.1)) == {"mean": 0.1, "ci": [0.1, 0.1], "n": 13}
    assert mean_ci([21.37] * 5, groups=[0, 0, 1, 1, 2]) == {"mean": 21.37, "ci": [21.37, 21.37], "n": 5}


def test_mean_matches_numpy():
    data = np.random.default_rng(0).normal(20.0, 2.0, size=300)
    result = mean_ci(data)
    assert result["mean"] == pytest.approx(float(np.mean(data)), rel=1e-12)
    lo, hi = result["ci"]
    assert lo < result["mean"] < hi
    # The bootstrap interval should be close to the normal-theory one: mean +- 1.96 * sd / sqrt(n).
    half = 1.96 * data.std(ddof=1) / np.sqrt(data.size)
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.15)


def test_mean_interval_coverage():
    rng = np.random.default_rng(123)
    true_mean, hits, reps = 5.0, 0, 200
    for rep in range(reps):
        sample = rng.normal(true_mean, 1.0, size=50)
        lo, hi = mean_ci(sample, num_resamples=2000, seed=rep)["ci"]
        hits += lo <= true_mean <= hi
    assert 0.88 * reps <= hits <= 0.99 * reps


def test_confidence_level_changes_width():
    data = np.random.default_rng(2).normal(size=100)
    assert _width(mean_ci(data, confidence=0.5)["ci"]) < _width(mean_ci(data, confidence=0.99)["ci"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"base": [1.0, 2.0], "tuned": [1.0]}, "paired"),
        ({"base": [], "tuned": []}, "empty"),
        ({"base": [1.0, 2.0, 3.0], "tuned": [1.0, np.nan, np.inf]}, r"2 non-finite.*index 1"),
        ({"base": [1.0, 2.0], "tuned": [2.0, 1.0], "groups": [0]}, "groups"),
        ({"base": [1.0], "tuned": [2.0], "confidence": 1.0}, "confidence"),
        ({"base": [1.0], "tuned": [2.0], "confidence": 0.0}, "confidence"),
        ({"base": [1.0], "tuned": [2.0], "num_resamples": 0}, "num_resamples"),
        ({"base": [[1.0]], "tuned": [[2.0]]}, "1-D"),
    ],
)
def test_win_rate_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        win_rate(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scores": []}, "empty"),
        ({"scores": [1.0, float("nan")]}, r"1 non-finite.*index 1"),
        ({"scores": [1.0, 2.0], "groups": [0, 1, 2]}, "groups"),
        ({"scores": [1.0], "confidence": 1.5}, "confidence"),
        ({"scores": [1.0], "num_resamples": -1}, "num_resamples"),
    ],
)
def test_mean_ci_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mean_ci(**kwargs)
