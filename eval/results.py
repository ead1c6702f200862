"""The figures of an evaluation, computed from per-image scores (and human judgments when given).

- per model and scorer: the mean with a bootstrap 95% interval (prompts resampled, so several
  seeds of one prompt count as one draw);
- per scorer, for every ordered pair of models: the win rate of A over B on the same items
  (ties 0.5) with a paired bootstrap interval, ``win_rates[scorer][A][B]``; by construction
  ``A over B = 1 - B over A``;
- human win rates from a judgments table: rows ``prompt, image_0, image_1, label_0`` (label_0
  = 1 when image_0 was preferred, 0 when image_1 was, 0.5 for a tie; images as the manifest's
  paths), the model of each image read from the manifest;
- training curves from the run folders' ``log.jsonl``: the monitored reward and oracle, the
  training reward and loss, whichever the run logged.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pickalign.eval.winrate import grouped_bootstrap_interval, win_rate

CURVE_KEYS = ("monitor/", "train/reward_mean", "train/loss")


def mean_interval(values, groups, seed: int = 0) -> dict:
    """{"mean", "low", "high", "n"}: the mean of ``values`` with a bootstrap 95% interval that
    resamples whole ``groups``."""
    values = np.asarray(values, dtype=float)
    low, high = grouped_bootstrap_interval(values, groups, seed=seed)
    return {"mean": float(values.mean()), "low": low, "high": high, "n": int(values.size)}


def score_figures(scores: dict[str, dict[str, np.ndarray]], prompts: list[str]) -> dict:
    """``scores[model][scorer]``: per-item scores in item order; ``prompts`` the item prompts.
    Returns ``{"means": ..., "win_rates": ...}`` (see the module docstring)."""
    models = list(scores)
    scorers = list(scores[models[0]]) if models else []
    means = {m: {s: mean_interval(scores[m][s], prompts) for s in scorers} for m in models}
    win_rates = {
        s: {
            a: {
                b: win_rate(scores[a][s], scores[b][s], groups=prompts).as_dict()
                for b in models
                if b != a
            }
            for a in models
        }
        for s in scorers
    }
    return {"means": means, "win_rates": win_rates}


def read_table(path: str | Path):
    """A csv, tsv, jsonl, json or parquet file as a DataFrame."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    if path.suffix == ".jsonl":
        return pd.read_json(path, lines=True)
    if path.suffix == ".json":
        return pd.DataFrame(json.loads(path.read_text()))
    return pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",")


JUDGMENT_COLUMNS = ("prompt", "image_0", "image_1", "label_0")


def human_win_rates(judgments, manifest: list[dict]) -> dict:
    """Win rates from human judgments (see the module docstring): ``{"judgments": n,
    "win_rates": {A: {B: win rate of A over B}}}`` for every pair of models judged together."""
    missing = [c for c in JUDGMENT_COLUMNS if c not in judgments.columns]
    if missing:
        raise ValueError(
            f"human judgments: missing column(s) {', '.join(missing)}; expected "
            f"{', '.join(JUDGMENT_COLUMNS)} (label_0: 1 image_0 preferred, 0 image_1, 0.5 tie)"
        )
    model_of = {row["path"]: row["model"] for row in manifest}
    prompt_of = {row["path"]: row["prompt"] for row in manifest}
    by_pair: dict[tuple[str, str], list[tuple[float, str]]] = {}
    for row in judgments.itertuples(index=False):
        label = float(row.label_0)
        if label not in (0.0, 0.5, 1.0):
            raise ValueError(f"human judgments: label_0 must be 1, 0 or 0.5, got {row.label_0!r}")
        try:
            a, b = model_of[row.image_0], model_of[row.image_1]
        except KeyError as error:
            raise ValueError(
                f"human judgments: image {error.args[0]!r} is not in this evaluation's manifest"
            ) from None
        for path in (row.image_0, row.image_1):
            if prompt_of[path] != row.prompt:
                raise ValueError(
                    f"human judgments: {path!r} was judged for {row.prompt!r}, but this "
                    f"evaluation's image answers {prompt_of[path]!r} (judgments of another "
                    "evaluation in the same folder?)"
                )
        if a != b:
            by_pair.setdefault((a, b), []).append((label, row.prompt))
            by_pair.setdefault((b, a), []).append((1 - label, row.prompt))
    rates: dict[str, dict[str, dict]] = {}
    for (a, b), rows in by_pair.items():
        outcomes = np.array([label for label, _ in rows])
        rate = win_rate(outcomes, np.full(len(rows), 0.5), groups=[p for _, p in rows])
        rates.setdefault(a, {})[b] = rate.as_dict()
    return {"judgments": int(len(judgments)), "win_rates": rates}


def training_curves(run: str | Path) -> dict:
    """``{"steps": {name: [...]}, "values": {name: [...]}}`` of the curves a run logged (see
    ``CURVE_KEYS``), from ``<run>/log.jsonl``."""
    path = Path(run) / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"training run {run}: no log.jsonl (is it a run folder?)")
    points: dict[str, dict[int, float]] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        for key, value in entry.items():
            if key.startswith(CURVE_KEYS) and isinstance(value, (int, float)):
                # a resumed run logs its later steps again: the last value of a step counts
                points.setdefault(key, {})[int(entry["step"])] = float(value)
    return {
        "steps": {key: sorted(p) for key, p in points.items()},
        "values": {key: [p[s] for s in sorted(p)] for key, p in points.items()},
    }
