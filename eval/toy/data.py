"""Write a toy-world preference dataset in the exact Pick-a-Pic schema.

Each row is one prompt and two images from a mix of sources, labelled by the oracle (ties
included), like Pick-a-Pic's pairs from different models:

- ``render``: a clean render of the prompt;
- ``render-wrong-1`` / ``render-wrong-2``: a render with one or two attributes changed;
- ``toy-sd`` / ``toy-sdxl``: the toy base models' own samples (the shipped ones, or pipelines
  named with ``with_base_models``, say a base retrained with ``recipes/pretrain_toy.py``).

Prompts of train, validation and test are disjoint (``pickalign.reward.toyworld.prompt_splits``);
``validation_unique`` and ``test_unique`` keep one example per prompt of validation and test,
as the paper built them. The same seed gives byte-identical files.
"""

from __future__ import annotations

import io
import uuid
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from PIL import Image

from pickalign.align.sampler import generate
from pickalign.reward.data import unique_prompt_rows, write_split
from pickalign.reward.toyworld import COLOURS, SHAPES, Attributes, prefer, prompt_splits, render

TOY_MODELS = Path(__file__).parent / "assets"
RENDER_SOURCES = {"render": 0, "render-wrong-1": 1, "render-wrong-2": 2}
# Share of each image source; base-model sources only where a base model is available.
SOURCE_WEIGHTS = {"render": 0.2, "render-wrong-1": 0.2, "render-wrong-2": 0.1, "base": 0.5}


def shipped_toy_models() -> dict[str, Path]:
    """The toy base pipelines that ship with pickalign: {"toy-sd": folder, "toy-sdxl": folder}."""
    found = {f"toy-{name}": TOY_MODELS / name for name in ("sd", "sdxl")}
    return {name: path for name, path in found.items() if _is_pipeline(path)}


def _is_pipeline(folder: Path) -> bool:
    return (folder / "model_index.json").exists()


def with_base_models(overrides: dict[str, str | Path]) -> dict[str, Path]:
    """The shipped toy models with some sources replaced or added: ``{"toy-sd": folder}`` makes
    the toy-sd sides of the pairs come from that pipeline folder."""
    models = shipped_toy_models()
    for name, folder in overrides.items():
        folder = Path(folder)
        if not _is_pipeline(folder):
            raise ValueError(
                f"base model {name!r}: {folder} is not a diffusers pipeline folder "
                "(no model_index.json)"
            )
        if name in RENDER_SOURCES or name == "base":
            raise ValueError(f"base model name {name!r} is taken by a render source")
        models[name] = folder
    return models


def with_wrong_attributes(attributes: Attributes, count: int, rng) -> Attributes:
    """``attributes`` with ``count`` of colour / shape / background changed (colours stay distinct)."""
    values = dict(
        colour=attributes.colour, shape=attributes.shape, background=attributes.background
    )
    for name in rng.permutation(["colour", "shape", "background"])[:count]:
        choices = SHAPES if name == "shape" else COLOURS
        options = [v for v in choices if v != values[name]]
        if name != "shape":  # object and background colours never coincide
            other = values["background" if name == "colour" else "colour"]
            options = [v for v in options if v != other]
        values[name] = options[rng.integers(len(options))]
    return Attributes(**values)


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _plan_split(prompts, pairs_per_prompt, mix: dict[str, float], sources, rng) -> list[dict]:
    """Choose, for every pair, each side's source and the randomness that makes its image.
    ``mix`` maps a source (or "base": any of ``sources``) to its share of image sides."""
    names = list(mix)
    weights = np.array([mix[n] for n in names], dtype=float)
    plans = []
    for attributes in prompts:
        for _ in range(pairs_per_prompt):
            sides = []
            for kind in rng.choice(names, size=2, p=weights / weights.sum()):
                if kind == "base":
                    kind = sources[rng.integers(len(sources))]
                sides.append({"source": str(kind), "seed": int(rng.integers(2**31))})
            plans.append({"attributes": attributes, "sides": sides})
    return plans


def source_mix(mix: dict[str, float] | None, base_models: dict[str, Path]) -> dict[str, float]:
    """The default mix (renders and, where available, base-model samples), or ``mix`` checked:
    every source must be a render kind, "base", or one of ``base_models``."""
    if mix is None:
        return {k: v for k, v in SOURCE_WEIGHTS.items() if k != "base" or base_models}
    known = set(RENDER_SOURCES) | set(base_models) | ({"base"} if base_models else set())
    unknown = sorted(set(mix) - known)
    if unknown or not mix or any(v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError(
            f"bad source mix {mix}: sources must be among {sorted(known)} with positive shares"
            + (f" (unknown: {unknown})" if unknown else "")
        )
    return dict(mix)


def _make_images(plans, base_models: dict[str, Path], sample_steps: int) -> None:
    """Fill in ``side["image"]`` for every side of every plan (renders, then model samples)."""
    for plan in plans:
        for side in plan["sides"]:
            wrong = RENDER_SOURCES.get(side["source"])
            if wrong is not None:
                rng = np.random.default_rng(side["seed"])
                shown = with_wrong_attributes(plan["attributes"], wrong, rng)
                side["image"] = render(shown, rng)
    for name, folder in base_models.items():
        wanted = [(p, s) for p in plans for s in p["sides"] if s["source"] == name]
        if not wanted:
            continue
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(folder)
        prompts = [p["attributes"].prompt for p, _ in wanted]
        images = generate(pipe, prompts, [s["seed"] for _, s in wanted], steps=sample_steps)
        for (_, side), image in zip(wanted, images):
            side["image"] = image


def _rows(plans, rng, start_index: int) -> list[dict]:
    counts = Counter(p["attributes"].prompt for p in plans)
    rows = []
    for offset, plan in enumerate(plans):
        index = start_index + offset
        prompt = plan["attributes"].prompt
        images = [side["image"] for side in plan["sides"]]
        label_0, label_1 = prefer(plan["attributes"], *images)
        uids = [
            str(uuid.UUID(int=int(rng.integers(2**63)) << 64 | int(rng.integers(2**63))))
            for _ in (0, 1)
        ]
        best = uids[0] if label_0 > label_1 else uids[1] if label_1 > label_0 else ""
        rows.append(
            {
                "are_different": True,
                "best_image_uid": best,
                "caption": prompt,
                "created_at": datetime(2026, 1, 1) + timedelta(seconds=index),
                "has_label": True,
                "image_0_uid": uids[0],
                "image_0_url": f"toy://{uids[0]}.jpg",
                "image_1_uid": uids[1],
                "image_1_url": f"toy://{uids[1]}.jpg",
                "jpg_0": _jpeg(images[0]),
                "jpg_1": _jpeg(images[1]),
                "label_0": label_0,
                "label_1": label_1,
                "model_0": plan["sides"][0]["source"],
                "model_1": plan["sides"][1]["source"],
                "ranking_id": index,
                "user_id": int(rng.integers(100)),
                "num_example_per_prompt": counts[prompt],
                "__index_level_0__": index,
            }
        )
    return rows


def generate_toy_dataset(
    out: str | Path,
    seed: int = 0,
    prompts: int | None = None,
    pairs_per_prompt: int = 4,
    eval_pairs_per_prompt: int = 2,
    base_models: dict[str, Path] | None = None,
    sample_steps: int = 20,
    mix: dict[str, float] | None = None,
) -> dict[str, int]:
    """Write the five splits under ``out/data``; returns the row count per split.

    ``prompts`` caps the number of train prompts (default: all 200). ``base_models`` maps a
    source name to a pipeline folder (default: the shipped toy models; ``{}`` for renders only).
    ``mix`` sets each source's share of image sides, e.g. ``{"toy-sd": 0.75, "render": 0.25}``
    for mostly on-policy pairs of one base model (default: ``SOURCE_WEIGHTS``).
    """
    from tqdm.auto import tqdm

    base_models = shipped_toy_models() if base_models is None else base_models
    mix = source_mix(mix, base_models)
    splits = prompt_splits()
    rng = np.random.default_rng(seed)
    sizes, start = {}, 0
    written = {}
    for split in tqdm(("train", "validation", "test"), desc="toy dataset"):
        chosen = splits[split][:prompts] if split == "train" else splits[split]
        per_prompt = pairs_per_prompt if split == "train" else eval_pairs_per_prompt
        plans = _plan_split(chosen, per_prompt, mix, sorted(base_models), rng)
        _make_images(plans, base_models, sample_steps)
        written[split] = _rows(plans, rng, start)
        start += len(plans)
    written["validation_unique"] = unique_prompt_rows(written["validation"])
    written["test_unique"] = unique_prompt_rows(written["test"])
    for split, rows in written.items():
        write_split(rows, out, split)
        sizes[split] = len(rows)
    return sizes
