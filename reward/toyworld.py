"""The toy preference world: prompts like "a red circle on a blue background", a renderer that
draws them, and an oracle that reads any pixel image back into attributes and so knows the
"human" preference exactly.

Everything here is numpy and PIL. The oracle never sees render parameters: it finds the
background colour on the image border, segments the object by colour distance, names colours by
the nearest palette entry and the shape by the best-fitting template, scaled to the object's area
and placed on its centroid. It works on the renderer's images and on any model's samples alike.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache
from itertools import product

import numpy as np
from PIL import Image

IMAGE_SIZE = 32
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 60),
    "cyan": (30, 200, 220),
    "blue": (35, 60, 215),
    "purple": (140, 50, 190),
    "pink": (245, 140, 200),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "cross", "diamond")
ATTRIBUTE_NAMES = ("colour", "shape", "background")
PROMPT_PATTERN = re.compile(r"^an? (\w+) (\w+) on an? (\w+) background$")
# Held-out prompt counts: test_unique and validation_unique prompts never appear in train.
SPLIT_SIZES = {"test": 200, "validation": 50}


@dataclass(frozen=True)
class Attributes:
    colour: str
    shape: str
    background: str

    @property
    def prompt(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"

    def as_tuple(self) -> tuple[str, str, str]:
        return (self.colour, self.shape, self.background)


def all_attributes() -> list[Attributes]:
    """Every valid combination (450): the object never has the background's colour."""
    return [Attributes(c, s, b) for c, s, b in product(COLOURS, SHAPES, COLOURS) if c != b]


def parse_prompt(prompt: str) -> Attributes:
    match = PROMPT_PATTERN.match(prompt.strip().lower())
    if not match or match[1] not in COLOURS or match[2] not in SHAPES or match[3] not in COLOURS:
        raise ValueError(f"not a toy-world prompt: {prompt!r}")
    return Attributes(match[1], match[2], match[3])


def prompt_splits(seed: int = 0) -> dict[str, list[Attributes]]:
    """A fixed partition of all combinations into train / validation / test prompts."""
    combos = all_attributes()
    random.Random(seed).shuffle(combos)
    test, rest = combos[: SPLIT_SIZES["test"]], combos[SPLIT_SIZES["test"] :]
    validation, train = rest[: SPLIT_SIZES["validation"]], rest[SPLIT_SIZES["validation"] :]
    return {"train": train, "validation": validation, "test": test}


# ----------------------------------------------------------------------------------------------
# Shapes, shared by the renderer and the oracle's templates. Coordinates are in [-1, 1] over
# the shape's bounding box, y pointing down.


def shape_mask(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    if shape == "circle":
        return x**2 + y**2 <= 1
    if shape == "square":
        return (np.abs(x) <= 1) & (np.abs(y) <= 1)
    if shape == "triangle":  # apex up
        return (y >= -1) & (y <= 1) & (np.abs(x) <= (y + 1) / 2)
    if shape == "cross":
        inside = (np.abs(x) <= 1) & (np.abs(y) <= 1)
        return inside & ((np.abs(x) <= 0.36) | (np.abs(y) <= 0.36))
    if shape == "diamond":
        return np.abs(x) + np.abs(y) <= 1
    raise ValueError(f"unknown shape {shape!r}; shapes are {SHAPES}")


def render(
    attributes: Attributes, rng: np.random.Generator, size: int = IMAGE_SIZE, supersample: int = 4
) -> Image.Image:
    """Draw ``attributes`` with jitter in position, size and shade, antialiased by supersampling."""
    n = size * supersample
    coords = (np.arange(n) + 0.5) / supersample
    xx, yy = np.meshgrid(coords, coords)
    centre = size / 2 + rng.uniform(-2, 2, size=2)
    half = size * rng.uniform(0.28, 0.36)
    mask = shape_mask(attributes.shape, (xx - centre[0]) / half, (yy - centre[1]) / half)

    def shade(name: str) -> np.ndarray:
        return np.clip(np.array(COLOURS[name]) + rng.uniform(-12, 12, size=3), 0, 255)

    canvas = np.where(mask[..., None], shade(attributes.colour), shade(attributes.background))
    canvas = canvas.reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3))
    return Image.fromarray(canvas.round().astype(np.uint8), "RGB")


# ----------------------------------------------------------------------------------------------
# The oracle

_PALETTE_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _PALETTE_NAMES], dtype=np.float64)


def _nearest_colour(rgb: np.ndarray) -> str:
    return _PALETTE_NAMES[int(np.argmin(((_PALETTE - rgb) ** 2).sum(axis=1)))]


def read_image(image: Image.Image) -> Attributes | None:
    """What the image shows, by pixel analysis alone; None when no object stands out."""
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    border = np.concatenate(
        [
            pixels[:2].reshape(-1, 3),
            pixels[-2:].reshape(-1, 3),
            pixels[:, :2].reshape(-1, 3),
            pixels[:, -2:].reshape(-1, 3),
        ]
    )
    background_rgb = np.median(border, axis=0)
    distance = np.sqrt(((pixels - background_rgb) ** 2).sum(axis=-1))
    far = np.percentile(distance, 95)
    if far < 30:  # nothing differs from the background
        return None
    mask = distance > far / 2
    core = distance > far * 0.8
    colour = _nearest_colour(np.median(pixels[core], axis=0))
    return Attributes(colour, _fit_shape(mask), _nearest_colour(background_rgb))


@lru_cache(maxsize=1)
def _template_stats() -> dict[str, tuple[float, float, float]]:
    """Per shape, in unit coordinates: area (as a share of the [-1, 1] box, times 4) and the
    centroid (y, x), measured on a fine grid."""
    grid = (np.arange(400) + 0.5) / 200 - 1
    x, y = np.meshgrid(grid, grid)
    stats = {}
    for shape in SHAPES:
        mask = shape_mask(shape, x, y)
        stats[shape] = (mask.mean() * 4, y[mask].mean(), x[mask].mean())
    return stats


def _fit_shape(mask: np.ndarray) -> str:
    """The shape whose template, scaled to the object's area and placed on its centroid,
    overlaps the object best (IoU). Matching area and centroid rather than the bounding box keeps
    blurred tips and corners, as a VAE or a model draws them, from skewing the fit."""
    area = mask.sum()
    rows, cols = np.nonzero(mask)
    centre_y, centre_x = rows.mean() + 0.5, cols.mean() + 0.5
    grid = np.arange(mask.shape[0]) + 0.5
    xx, yy = np.meshgrid(grid, grid)

    def iou(shape: str) -> float:
        unit_area, mean_y, mean_x = _template_stats()[shape]
        half = np.sqrt(area / unit_area)
        template = shape_mask(
            shape, (xx - centre_x) / half + mean_x, (yy - centre_y) / half + mean_y
        )
        return (template & mask).sum() / max((template | mask).sum(), 1)

    return max(SHAPES, key=iou)


@dataclass(frozen=True)
class Verdict:
    """Which of the prompt's attributes an image satisfies."""

    wanted: Attributes
    seen: Attributes | None

    @property
    def satisfied(self) -> dict[str, bool]:
        seen = self.seen.as_tuple() if self.seen else (None, None, None)
        return {name: w == s for name, w, s in zip(ATTRIBUTE_NAMES, self.wanted.as_tuple(), seen)}

    @property
    def score(self) -> int:
        return sum(self.satisfied.values())

    @property
    def all_correct(self) -> bool:
        return self.score == len(ATTRIBUTE_NAMES)


def judge(prompt: str | Attributes, image: Image.Image) -> Verdict:
    wanted = prompt if isinstance(prompt, Attributes) else parse_prompt(prompt)
    return Verdict(wanted, read_image(image))


def prefer(
    prompt: str | Attributes, image_0: Image.Image, image_1: Image.Image
) -> tuple[float, float]:
    """The oracle's Pick-a-Pic labels: (1, 0) or (0, 1) for the image satisfying more
    attributes, (0.5, 0.5) for a tie."""
    score_0, score_1 = judge(prompt, image_0).score, judge(prompt, image_1).score
    if score_0 == score_1:
        return (0.5, 0.5)
    return (1.0, 0.0) if score_0 > score_1 else (0.0, 1.0)


def adherence(verdicts: list[Verdict]) -> dict[str, float]:
    """Prompt adherence of a set of images: the share with every attribute right, the mean share
    of attributes right, per-attribute accuracy, and how many images the oracle could not read."""
    n = len(verdicts)
    if n == 0:
        raise ValueError("no verdicts to summarise")
    result = {
        "n": n,
        "all_correct": sum(v.all_correct for v in verdicts) / n,
        "mean_attributes": sum(v.score for v in verdicts) / (n * len(ATTRIBUTE_NAMES)),
        "unreadable": sum(v.seen is None for v in verdicts) / n,
    }
    for name in ATTRIBUTE_NAMES:
        result[name] = sum(v.satisfied[name] for v in verdicts) / n
    return result


class OracleReward:
    """The oracle as a reward, with PickScore's interface: ``score(prompts, images)`` gives the
    number of the prompt's attributes each image satisfies (0-3) as a float tensor, so a method
    that trains on a reward can train on the toy world's ground truth.

    Images are PIL images, uint8 arrays (H, W, 3) or float tensors (3, H, W) in [0, 1] (a
    pipeline's ``output_type="pt"``)."""

    def score(self, prompts, images, batch_size: int | None = None):
        import torch

        prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
        scores = [judge(p, _as_pil(image)).score for p, image in zip(prompts, images)]
        return torch.tensor(scores, dtype=torch.float32)


def _as_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if hasattr(image, "detach"):  # a (3, H, W) tensor in [0, 1]
        array = (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0)
        return Image.fromarray(array.cpu().numpy())
    return Image.fromarray(np.asarray(image, dtype=np.uint8))
