"""Judging image sets with the toy world's oracle: adherence of each set and the win rate of
one set over another on the same prompts and seeds."""

from __future__ import annotations

from collections import Counter

import numpy as np
from PIL import Image

from eval.winrate import win_rate
from reward.toyworld import ATTRIBUTE_NAMES, adherence, all_attributes, judge, read_image, render


def oracle_compare(
    prompts: list[str], images_a: list[Image.Image], images_b: list[Image.Image], seed: int = 0
) -> dict:
    """Win rate of A over B by the oracle's attribute counts (ties 0.5), with a bootstrap 95%
    interval, and each set's adherence. ``images_a[i]`` and ``images_b[i]`` answer ``prompts[i]``."""
    if not len(prompts) == len(images_a) == len(images_b):
        raise ValueError(f"{len(prompts)} prompts, {len(images_a)} and {len(images_b)} images")
    verdicts_a = [judge(p, image) for p, image in zip(prompts, images_a)]
    verdicts_b = [judge(p, image) for p, image in zip(prompts, images_b)]
    rate = win_rate([v.score for v in verdicts_a], [v.score for v in verdicts_b], seed=seed)
    return {"win_rate": rate, "a": adherence(verdicts_a), "b": adherence(verdicts_b)}


def oracle_accuracy(renders: int = 1000, seed: int = 0, transform=None) -> dict:
    """How often the oracle reads every attribute of a fresh render right; ``transform`` (e.g. a
    VAE round trip) is applied to each render first. Returns overall and per-attribute figures
    and the most common confusions."""
    rng = np.random.default_rng(seed)
    combos = all_attributes()
    truth = [combos[i] for i in rng.integers(len(combos), size=renders)]
    images = [render(a, rng) for a in truth]
    if transform is not None:
        images = transform(images)
    read = [read_image(image) for image in images]
    confusions = Counter()
    per_attribute = dict.fromkeys(ATTRIBUTE_NAMES, 0)
    for wanted, seen in zip(truth, read):
        seen_values = seen.as_tuple() if seen else (None,) * 3
        for name, w, s in zip(ATTRIBUTE_NAMES, wanted.as_tuple(), seen_values):
            per_attribute[name] += w == s
            if w != s:
                confusions[f"{name}: {w} -> {s}"] += 1
    return {
        "renders": renders,
        "all_correct": sum(t == r for t, r in zip(truth, read)) / renders,
        **{name: count / renders for name, count in per_attribute.items()},
        "confusions": dict(confusions.most_common(5)),
    }
