"""Pairwise win rates with bootstrap confidence intervals.

Two image sets over the same prompts and seeds are compared item by item: A wins an item with
outcome 1, ties 0.5, loses 0. The win rate is the mean outcome, so wr(A, B) + wr(B, A) = 1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from pickalign.reward.evaluate import bootstrap_interval


@dataclass(frozen=True)
class WinRate:
    estimate: float
    low: float  # bootstrap percentile interval
    high: float
    n: int
    wins: int
    ties: int
    losses: int
    confidence: float = 0.95

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        level = round(self.confidence * 100)
        return (
            f"{self.estimate:.3f} [{level}% CI {self.low:.3f}, {self.high:.3f}] "
            f"(n={self.n}: {self.wins} wins, {self.ties} ties, {self.losses} losses)"
        )


def outcomes(scores_a, scores_b) -> np.ndarray:
    """Per-item outcome of A against B from per-item scores: 1 win, 0.5 tie, 0 loss."""
    a, b = np.asarray(scores_a, dtype=float), np.asarray(scores_b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"score lists must be 1-D and paired, got shapes {a.shape} and {b.shape}")
    return np.where(a > b, 1.0, np.where(a < b, 0.0, 0.5))


def win_rate(
    scores_a,
    scores_b,
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
    groups=None,
) -> WinRate:
    """Win rate of A over B (ties count 0.5) with a bootstrap interval.

    ``groups`` (one label per item, e.g. the prompt when each prompt has several seeds) makes the
    bootstrap resample whole groups, so correlated items do not narrow the interval.
    """
    result = outcomes(scores_a, scores_b)
    if groups is None:
        low, high = bootstrap_interval(result, confidence, resamples, seed)
    else:
        low, high = grouped_bootstrap_interval(result, groups, confidence, resamples, seed)
    return WinRate(
        estimate=float(result.mean()),
        low=low,
        high=high,
        n=int(result.size),
        wins=int((result == 1).sum()),
        ties=int((result == 0.5).sum()),
        losses=int((result == 0).sum()),
        confidence=confidence,
    )


def grouped_bootstrap_interval(
    values, groups, confidence: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``, resampling whole groups."""
    values = np.asarray(values, dtype=float)
    _, index = np.unique(np.asarray(groups), return_inverse=True)
    if index.size != values.size:
        raise ValueError(f"{values.size} values but {index.size} group labels")
    sums = np.bincount(index, weights=values)
    counts = np.bincount(index).astype(float)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, sums.size, size=(resamples, sums.size))
    means = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    tail = (1 - confidence) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))
