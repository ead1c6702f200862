"""The offline demo behind ``make demo``: the smallest end-to-end job on this machine.

It builds the tiny offline models, has the SD-style and SDXL-style pipelines generate image
pairs for a few prompts, writes them as a Pick-a-Pic dataset (the 19-column schema), reads it
back through the data layer, and saves an image grid of the pairs.
"""

from __future__ import annotations

import random
from datetime import datetime
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from reward.data import SPLITS, inspect_split, iter_pairs, load_pickapic, write_split

PROMPTS = ["a red circle on a blue background", "a green square", "a yellow triangle at night"]


def _jpeg(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _pair_row(index: int, prompt: str, images, models, label_0: float) -> dict:
    uid = [f"{index:06d}-{side}" for side in (0, 1)]
    return {
        "are_different": True,
        "best_image_uid": uid[0] if label_0 == 1.0 else uid[1] if label_0 == 0.0 else "",
        "caption": prompt,
        "created_at": datetime(2026, 1, 1),
        "has_label": True,
        "image_0_uid": uid[0],
        "image_0_url": f"local://{uid[0]}.jpg",
        "image_1_uid": uid[1],
        "image_1_url": f"local://{uid[1]}.jpg",
        "jpg_0": _jpeg(images[0]),
        "jpg_1": _jpeg(images[1]),
        "label_0": label_0,
        "label_1": 1.0 - label_0,
        "model_0": models[0],
        "model_1": models[1],
        "ranking_id": index,
        "user_id": 0,
        "num_example_per_prompt": 1,
        "__index_level_0__": index,
    }


def _grid(pairs, cell: int = 96) -> Image.Image:
    grid = Image.new("RGB", (2 * cell, (cell + 14) * len(pairs)), "white")
    draw = ImageDraw.Draw(grid)
    for row, pair in enumerate(pairs):
        top = row * (cell + 14)
        draw.text((2, top), pair.prompt[:32], fill="black")
        for col, image in enumerate((pair.image_0, pair.image_1)):
            grid.paste(image.resize((cell, cell)), (col * cell, top + 14))
    return grid


def run_demo(out: Path) -> Path:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from align.tiny import build_tiny_sd, build_tiny_sdxl

    models = out / "models"
    for name, build in (("sd", build_tiny_sd), ("sdxl", build_tiny_sdxl)):
        if not (models / name / "model_index.json").exists():
            build(models / name)
    pipes = {
        "tiny-sd": StableDiffusionPipeline.from_pretrained(models / "sd"),
        "tiny-sdxl": StableDiffusionXLPipeline.from_pretrained(models / "sdxl"),
    }
    rng = random.Random(0)
    rows = []
    for index, prompt in enumerate(PROMPTS):
        images = []
        for seed, pipe in enumerate(pipes.values()):
            pipe.set_progress_bar_config(disable=True)
            generator = torch.Generator().manual_seed(seed)
            images += pipe(
                prompt, num_inference_steps=5, height=64, width=64, generator=generator
            ).images
        rows.append(_pair_row(index, prompt, images, list(pipes), rng.choice([1.0, 0.0, 0.5])))
    data = out / "pickapic_demo"
    for split in SPLITS:
        write_split(rows, data, split)
    print(inspect_split(data, "train", progress=False).summary())
    pairs = list(iter_pairs(load_pickapic(data, "train")))
    grid_path = out / "pairs.png"
    _grid(pairs).save(grid_path)
    print(f"\ndemo outputs in {out.resolve()}:")
    print(f"  dataset (Pick-a-Pic schema): {data.resolve()}")
    print(f"  image grid of the pairs:     {grid_path.resolve()}")
    return grid_path
