"""Preference pairs for diffusion training: Pick-a-Pic rows -> (winner, loser) pixel tensors with
SDXL micro-conditioning, and an optional on-disk cache of their VAE latents and prompt embeddings.

Both images of a pair get the same flip and the same crop (at the same relative position when
their sizes differ), and each keeps its own original size, so the time ids
``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)`` say what the UNet really sees.

The cache (``build_cache``) is written in shards of ``shard_size`` pairs, each shard a
safetensors file renamed into place once complete, so an interrupted build resumes where it
stopped; prompt embeddings are stored once per distinct prompt. ``CachedPairs`` reads single rows
through memory-mapped files, so memory stays flat however large the dataset.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pickalign.align.models import Conditioning
from pickalign.reward.data import (
    BadRowError,
    DataReport,
    DatasetConfig,
    PairFilter,
    decode_row,
    first_rows,
    load_pickapic,
    split_bad,
    usable_rows,
)
from pickalign.runtime import atomic_path, atomic_write_text


@dataclass
class PairCrop:
    """One pair's augmentation, shared by both images."""

    flip: bool
    top_fraction: float  # where the crop sits in the free space, 0 = top / left edge
    left_fraction: float


def choose_crop(rng: np.random.Generator, random_crop: bool, random_flip: bool) -> PairCrop:
    if random_crop:
        return PairCrop(bool(random_flip and rng.random() < 0.5), rng.random(), rng.random())
    return PairCrop(bool(random_flip and rng.random() < 0.5), 0.5, 0.5)  # centre crop


def prepare_image(image: Image.Image, resolution: int, crop: PairCrop):
    """Resize the short side to ``resolution``, flip, crop a square; returns the (3, R, R) tensor
    in [-1, 1] and its time ids (orig_h, orig_w, top, left, R, R)."""
    width, height = image.size
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    resized = image.resize((new_w, new_h), Image.BICUBIC)
    if crop.flip:
        resized = resized.transpose(Image.FLIP_LEFT_RIGHT)
    top = round(crop.top_fraction * (new_h - resolution))
    left = round(crop.left_fraction * (new_w - resolution))
    patch = resized.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(patch, dtype=np.float32)
    pixels = torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1
    time_ids = torch.tensor([height, width, top, left, resolution, resolution], dtype=torch.float32)
    return pixels, time_ids


def orient(pair) -> tuple[Image.Image, Image.Image]:
    """(winner, loser) of a decoded pair; a tie keeps its order."""
    return (
        (pair.image_0, pair.image_1)
        if pair.label_0 > pair.label_1
        else (pair.image_1, pair.image_0)
    )


class PreferencePairs(torch.utils.data.Dataset):
    """Pick-a-Pic rows as training pairs: ``pixels`` (2, 3, R, R) winner first, ``time_ids``
    (2, 6), ``prompt``, ``label`` (1, or 0.5 for a tie when ties are kept). Ties, unlabeled rows and identical images are dropped up front from the
    label columns (no image decoded); a bad row raises naming row and column, or with
    ``skip_bad`` yields None (the collate drops it and the loop counts it).

    Augmentation is drawn from (seed, row), so the same row gets the same crop in every epoch and
    after a resume.
    """

    def __init__(
        self,
        rows,
        resolution: int,
        filters: PairFilter | None = None,
        skip_bad: bool = False,
        random_crop: bool = False,
        random_flip: bool = False,
        seed: int = 0,
    ):
        self.rows, self.resolution, self.skip_bad = rows, resolution, skip_bad
        self.filters = filters or PairFilter(keep_ties=False)
        self.random_crop, self.random_flip, self.seed = random_crop, random_flip, seed
        self.report = DataReport()  # rows read, dropped by filter, bad labels (under skip)
        self.index = usable_rows(rows, self.filters, skip_bad, self.report)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        row_index = int(self.index[i])
        pair = decode_row(self.rows, row_index, self.filters, self.skip_bad)
        if isinstance(pair, BadRowError):  # skipped: the collate hands it on to be counted
            return pair
        crop = choose_crop(
            np.random.default_rng([self.seed, row_index]), self.random_crop, self.random_flip
        )
        prepared = [prepare_image(im, self.resolution, crop) for im in orient(pair)]
        return {
            "prompt": pair.prompt,
            "pixels": torch.stack([p for p, _ in prepared]),
            "time_ids": torch.stack([t for _, t in prepared]),
            "label": torch.tensor(0.5 if pair.is_tie else 1.0),  # P(first is preferred)
        }


def collate_pairs(items):
    """Stack items; ``bad_rows`` ({row: reason}) holds the skipped ones, and is all a batch of
    only bad rows holds."""
    items, bad = split_bad(items)
    if not items:
        return {"bad_rows": bad}
    batch = {"prompt": [item["prompt"] for item in items], "bad_rows": bad}
    for key in ("pixels", "time_ids", "latents", "context", "pooled", "label"):
        if key in items[0]:
            batch["labels" if key == "label" else key] = torch.stack([item[key] for item in items])
    return batch


# ----------------------------------------------------------------------------------------------
# Precompute cache

INDEX_FILE = "cache.json"
UNCONDITIONAL_FILE = "unconditional.safetensors"  # the caption-dropout embedding


def _shard_path(folder: Path, kind: str, number: int) -> Path:
    return folder / f"{kind}-{number:05d}.safetensors"


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata=None) -> None:
    """Write a safetensors file atomically: a stopped build never leaves a half-written shard."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


@torch.no_grad()
def build_cache(
    parts,
    dataset: PreferencePairs,
    folder: str | Path,
    shard_size: int = 1024,
    batch_size: int = 16,
    dtype: torch.dtype = torch.float16,
    progress: bool = True,
    describe: dict | None = None,
) -> Path:
    """Encode every pair of ``dataset`` once with ``parts`` (VAE posterior means, prompt
    embeddings) into ``folder``. Shards already on disk are kept, so a stopped build resumes.
    Returns ``folder``. ``describe`` (model, resolution, ...) is recorded and must match on resume.
    """
    from tqdm.auto import tqdm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index_path = folder / INDEX_FILE
    header = {
        "pairs_in_dataset": len(dataset),
        "shard_size": shard_size,
        "family": parts.family,
        "unconditional": "zeros" if parts.zeros_for_empty else "empty prompt",
        **(describe or {}),
    }
    plan_path = folder / "plan.json"
    if plan_path.exists():
        planned = json.loads(plan_path.read_text())
        if planned != header:
            raise ValueError(
                f"cache in {folder} was started with {planned}, this run asks for {header}; "
                "use another cache folder or delete this one"
            )
    else:
        atomic_write_text(plan_path, json.dumps(header, indent=2))
    shards = range(0, len(dataset), shard_size)
    prompts: dict[str, int] = {}
    kept_per_shard, all_bad = [], {}  # bad rows skipped: {row: reason}
    bar = tqdm(total=len(dataset), desc="caching latents", disable=not progress)
    for number, start in enumerate(shards):
        path = _shard_path(folder, "pairs", number)
        items_range = range(start, min(start + shard_size, len(dataset)))
        if path.exists():  # done by an earlier run: read its prompts back for the text shards
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                shard = json.loads(f.metadata()["shard"])
                kept = f.get_slice("latents").get_shape()[0]
            all_bad.update({int(row): reason for row, reason in shard["bad_rows"].items()})
            for name in shard["prompts"]:
                prompts.setdefault(name, len(prompts))
            kept_per_shard.append(kept)
            bar.update(len(items_range))
            continue
        latents, time_ids, labels, shard_prompts, bad_rows = [], [], [], [], {}
        for chunk_start in range(items_range.start, items_range.stop, batch_size):
            chunk = [
                dataset[i]
                for i in range(chunk_start, min(chunk_start + batch_size, items_range.stop))
            ]
            batch = collate_pairs(chunk)
            bar.update(len(chunk))
            bad_rows.update(batch["bad_rows"])
            if "pixels" not in batch:
                continue
            pixels = batch["pixels"]
            encoded = parts.encode_images(pixels.flatten(0, 1)).float().cpu()
            latents.append(encoded.view(len(pixels), 2, *encoded.shape[1:]).to(dtype))
            time_ids.append(batch["time_ids"])
            labels.append(batch["labels"])
            shard_prompts += batch["prompt"]
        for name in shard_prompts:
            prompts.setdefault(name, len(prompts))
        tensors = {
            "latents": torch.cat(latents) if latents else torch.zeros(0),
            "time_ids": torch.cat(time_ids) if time_ids else torch.zeros(0),
            "label": torch.cat(labels) if labels else torch.zeros(0),
            "prompt_id": torch.tensor([prompts[p] for p in shard_prompts], dtype=torch.int64),
        }
        # One metadata entry: safetensors writes several in no fixed order, and a resumed build
        # must write the same bytes.
        shard = {"prompts": list(dict.fromkeys(shard_prompts)), "bad_rows": bad_rows}
        _save_tensors(tensors, path, {"shard": json.dumps(shard)})
        kept_per_shard.append(len(shard_prompts))
        all_bad.update(bad_rows)
    bar.close()
    _cache_prompts(parts, list(prompts), folder, shard_size, batch_size, dtype)
    index = {
        **header,
        "pair_shards": kept_per_shard,
        "prompts": len(prompts),
        "bad_rows": {str(row): reason for row, reason in sorted(all_bad.items())},
    }
    atomic_write_text(index_path, json.dumps(index, indent=2))
    return folder


def _cache_prompts(parts, prompts: list[str], folder: Path, shard_size, batch_size, dtype) -> None:
    """Prompt embeddings in prompt-id order, ``shard_size`` per file, plus the pipeline's
    unconditional embedding (caption dropout) as ``unconditional.safetensors``."""
    # Prompt ids are first-seen order across pair shards; each shard records its prompts in that
    # order, so a resumed build assigns the same ids.
    for number, start in enumerate(range(0, len(prompts), shard_size)):
        path = _shard_path(folder, "prompts", number)
        if path.exists():
            continue
        chunk = prompts[start : start + shard_size]
        contexts, pooled = [], []
        for i in range(0, len(chunk), batch_size):
            cond = parts.encode_prompts(chunk[i : i + batch_size])
            contexts.append(cond.context.float().cpu().to(dtype))
            if cond.pooled is not None:
                pooled.append(cond.pooled.float().cpu().to(dtype))
        tensors = {"context": torch.cat(contexts)}
        if pooled:
            tensors["pooled"] = torch.cat(pooled)
        _save_tensors(tensors, path)
    uncond = parts.unconditional()
    tensors = {"context": uncond.context.float().cpu().to(dtype)}
    if uncond.pooled is not None:
        tensors["pooled"] = uncond.pooled.float().cpu().to(dtype)
    _save_tensors(tensors, folder / UNCONDITIONAL_FILE)


class CachedPairs(torch.utils.data.Dataset):
    """Rows of a finished cache: ``latents`` (2, C, h, w) winner first, ``time_ids`` (2, 6),
    ``label``, ``context`` and (SDXL) ``pooled`` of the prompt, all fp32. Files are memory-mapped and rows
    read one at a time."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index_path = self.folder / INDEX_FILE
        if not index_path.exists():
            raise FileNotFoundError(
                f"{self.folder} is not a finished latent cache (no {INDEX_FILE}); build it first"
            )
        self.info = json.loads(index_path.read_text())
        counts = self.info["pair_shards"]
        self.offsets = np.cumsum([0] + counts)
        self.shard_size = self.info["shard_size"]
        # Rows the build skipped as bad ({row: reason}); a cache holds only good pairs.
        self.bad_rows = {int(row): reason for row, reason in self.info.get("bad_rows", {}).items()}
        self._open: dict[Path, object] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _file(self, path: Path):
        from safetensors import safe_open

        if path not in self._open:
            self._open[path] = safe_open(str(path), "pt")
        return self._open[path]

    def __getitem__(self, i: int):
        shard = int(np.searchsorted(self.offsets, i, side="right") - 1)
        row = i - int(self.offsets[shard])
        pairs = self._file(_shard_path(self.folder, "pairs", shard))
        prompt_id = int(pairs.get_slice("prompt_id")[row : row + 1][0])
        text = self._file(_shard_path(self.folder, "prompts", prompt_id // self.shard_size))
        text_row = prompt_id % self.shard_size
        item = {
            "prompt": prompt_id,
            "latents": pairs.get_slice("latents")[row : row + 1][0].float(),
            "time_ids": pairs.get_slice("time_ids")[row : row + 1][0].float(),
            "label": pairs.get_slice("label")[row : row + 1][0].float(),
            "context": text.get_slice("context")[text_row : text_row + 1][0].float(),
        }
        if self.info["family"] == "sdxl":
            item["pooled"] = text.get_slice("pooled")[text_row : text_row + 1][0].float()
        return item

    def unconditional(self):
        """The pipeline's unconditional embedding (``DiffusionParts.unconditional``), in fp32
        like every item."""
        from safetensors.torch import load_file

        return {k: v.float() for k, v in load_file(self.folder / UNCONDITIONAL_FILE).items()}

    def __getstate__(self):  # DataLoader workers open their own handles
        return {**self.__dict__, "_open": {}}


# ----------------------------------------------------------------------------------------------
# The pairs a method trains on, from its config


@dataclass
class PairDataConfig(DatasetConfig):
    """Where the preference pairs come from and how they are prepared (a config mixin)."""

    split: str = field(default="train", metadata={"help": "Dataset split to train on."})
    keep_ties: bool = field(
        default=False, metadata={"help": "Train on ties too (target 0.5 instead of a winner)."}
    )
    max_pairs: int | None = field(
        default=None,
        metadata={
            "range": "> 0",
            "help": "Use only the first N usable pairs: the split is streamed only as far as the "
            "rows that hold them (a Hub split is not downloaded whole).",
        },
    )
    resolution: int = field(
        default=512, metadata={"range": "> 0", "help": "Training resolution (square)."}
    )
    random_crop: bool = field(default=False, metadata={"help": "Random instead of centre crop."})
    random_flip: bool = field(default=False, metadata={"help": "Flip half the pairs."})
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "Precompute VAE latents and prompt embeddings here once (resumable)."},
    )
    cache_shard_size: int = field(
        default=1024, metadata={"range": "> 0", "help": "Pairs per cache shard."}
    )


def rows_holding(source, split: str, pairs: int | None, filters: PairFilter, skip_bad: bool):
    """A split's rows: all of them, or the first rows that hold ``pairs`` usable pairs, read by
    streaming (``first_rows``: a Hub split is read only that far), a quarter more rows than pairs
    first and twice as many each time that falls short."""
    if not pairs:
        return load_pickapic(source, split, streaming=False)
    count = pairs + pairs // 4
    while True:
        rows = first_rows(source, split, count)
        if len(rows) < count or len(usable_rows(rows, filters, skip_bad)) >= pairs:
            return rows
        count *= 2


def make_pair_dataset(config, parts, accelerator, held_out: str | None = None, limit=None):
    """The training pairs (``config.split``, with its augmentation), or with ``held_out`` that
    split's pairs for validation (centre-cropped, unflipped, at most ``limit``); as raw pairs, or
    their precompute cache (built on the main process first if missing; a held-out split's cache
    sits beside the training one as ``<cache_dir>-<split>``)."""
    training = held_out is None
    split = config.split if training else held_out
    limit = config.max_pairs if training else limit
    crop, flip = (config.random_crop, config.random_flip) if training else (False, False)
    filters = PairFilter(keep_ties=config.keep_ties)
    rows = rows_holding(config.dataset, split, limit, filters, config.skip_bad_rows)
    pairs = PreferencePairs(
        rows, config.resolution, filters, config.skip_bad_rows, crop, flip, config.seed
    )
    if limit:
        pairs.index = pairs.index[:limit]
    if not config.cache_dir:
        return pairs
    cache_dir = config.cache_dir if training else f"{config.cache_dir.rstrip('/')}-{split}"
    if accelerator.is_main_process:
        parts.to(accelerator.device)
        describe = {
            "model": config.model,
            "vae": config.vae,
            "dataset": config.dataset,
            "split": split,
            "resolution": config.resolution,
            "random_crop": crop,
            "random_flip": flip,
            "keep_ties": config.keep_ties,
            "max_pairs": limit,
            "skip_bad_rows": config.skip_bad_rows,
            "seed": config.seed if crop or flip else None,  # draws the crops and flips
        }
        build_cache(
            parts,
            pairs,
            cache_dir,
            config.cache_shard_size,
            describe=describe,
            progress=accelerator.is_local_main_process,
        )
    accelerator.wait_for_everyone()
    cache = CachedPairs(cache_dir)
    cache.report = pairs.report.with_bad_rows(cache.bad_rows)
    return cache


def batch_inputs(batch, parts, cached: bool, device):
    """(latents (B, 2, C, h, w), conditioning, time_ids (B, 2, 6)) of a collated batch, on
    ``device``: read from the cache, or encoded with ``parts``."""
    time_ids = batch["time_ids"].to(device)
    if cached:
        pooled = batch.get("pooled")
        cond = Conditioning(
            batch["context"].to(device), None if pooled is None else pooled.to(device)
        )
        return batch["latents"].to(device), cond, time_ids
    pixels = batch["pixels"].to(device)
    latents = parts.encode_images(pixels.flatten(0, 1)).float()
    latents = latents.view(pixels.shape[0], 2, *latents.shape[1:])
    return latents, parts.encode_prompts(batch["prompt"]), time_ids


def drop_captions(cond: Conditioning, uncond: Conditioning, rate: float, generator=None):
    """Replace each pair's prompt by the unconditional embedding ``uncond`` (batch 1, from
    ``DiffusionParts.unconditional``) with probability ``rate``; returns the new conditioning and
    the (B,) mask of replaced pairs."""
    drop = torch.rand(len(cond.context), generator=generator) < rate
    if rate <= 0:
        return cond, drop
    drop = drop.to(cond.context.device)
    context = torch.where(drop[:, None, None], uncond.context.to(cond.context.dtype), cond.context)
    pooled = cond.pooled
    if pooled is not None:
        pooled = torch.where(drop[:, None], uncond.pooled.to(pooled.dtype), pooled)
    return Conditioning(context, pooled), drop
