"""Preference accuracy by the Pick-a-Pic protocol, with bootstrap intervals.

The model predicts a tie when |p0 - p1| <= t, where (p0, p1) is the softmax over the pair's two
scores. t is chosen on validation_unique and applied to test_unique. A prediction scores 1 when it
matches the label, 0.5 when exactly one of prediction and label is a tie, 0 otherwise. The
ties-excluded accuracy drops tie labels and never predicts a tie.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

TIE = 0.5


def bootstrap_interval(
    values, confidence: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        raise ValueError("no values to bootstrap")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    tail = (1 - confidence) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def predict(p0: np.ndarray, threshold: float) -> np.ndarray:
    """Predicted label_0 per pair: 1, 0, or 0.5 (tie) when |p0 - p1| <= threshold."""
    p0 = np.asarray(p0, dtype=float)
    return np.where(np.abs(2 * p0 - 1) <= threshold, TIE, (p0 > 0.5).astype(float))


def pair_scores(predicted: np.ndarray, label_0: np.ndarray) -> np.ndarray:
    """1 for a match, 0.5 when exactly one side is a tie, 0 otherwise."""
    predicted, label_0 = np.asarray(predicted, float), np.asarray(label_0, float)
    one_tie = (predicted == TIE) ^ (label_0 == TIE)
    return np.where(predicted == label_0, 1.0, np.where(one_tie, 0.5, 0.0))


def choose_threshold(
    p0: np.ndarray, label_0: np.ndarray, grid: Iterable[float] | None = None
) -> float:
    """The tie threshold with the best mean score (the smallest such, on ties)."""
    grid = np.linspace(0, 1, 101) if grid is None else np.asarray(list(grid))
    means = [pair_scores(predict(p0, t), label_0).mean() for t in grid]
    return float(grid[int(np.argmax(means))])


def accuracy_report(
    val_p0: np.ndarray, val_label_0: np.ndarray, test_p0: np.ndarray, test_label_0: np.ndarray
) -> dict:
    """The protocol's figures on test, with bootstrap 95% intervals."""
    threshold = choose_threshold(val_p0, val_label_0)
    with_ties = pair_scores(predict(test_p0, threshold), test_label_0)
    decided = np.asarray(test_label_0) != TIE
    no_ties = pair_scores(
        predict(np.asarray(test_p0)[decided], 0.0), np.asarray(test_label_0)[decided]
    )
    report = {"tie_threshold": threshold, "test_pairs": int(len(with_ties))}
    report["accuracy"] = float(with_ties.mean())
    report["accuracy_ci95"] = bootstrap_interval(with_ties)
    report["test_pairs_without_ties"] = int(decided.sum())
    if decided.any():
        report["accuracy_no_ties"] = float(no_ties.mean())
        report["accuracy_no_ties_ci95"] = bootstrap_interval(no_ties)
    return report


@torch.inference_mode()
def pair_probabilities(scorer, pairs, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """p0 (the softmax weight of image_0) and label_0 for every pair, scored with ``scorer``
    (a :class:`pickalign.reward.pickscore.PickScore`)."""
    p0, labels = [], []
    pairs = list(pairs)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        prompts = [p.prompt for p in chunk] * 2
        images = [p.image_0 for p in chunk] + [p.image_1 for p in chunk]
        scores = scorer.score(prompts, images).view(2, len(chunk))
        p0 += scores.softmax(dim=0)[0].tolist()
        labels += [p.label_0 for p in chunk]
    return np.array(p0), np.array(labels)


def evaluate_reward(scorer, source, on_bad: str = "error") -> dict:
    """The protocol on a Pick-a-Pic source: threshold on validation_unique, figures on test_unique."""
    from pickalign.reward.data import iter_pairs, load_pickapic

    def split(name):
        return pair_probabilities(scorer, iter_pairs(load_pickapic(source, name), on_bad=on_bad))

    return accuracy_report(*split("validation_unique"), *split("test_unique"))
