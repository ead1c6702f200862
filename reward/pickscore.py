"""PickScore: a CLIP model fine-tuned to predict which image a person prefers for a prompt.

``PickScore.score`` is the model card's computation, batched: ``logit_scale.exp()`` times the
cosine similarity of the prompt and image embeddings. ``probs`` is the softmax over one prompt's
candidates. ``PickScore.differentiable`` preprocesses decoded image tensors on the device with
differentiable ops, so its scores carry gradients back to the pixels (for gradient-based
alignment).

The released model is ``yuvalkirstain/PickScore_v1`` with the processor of
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``; any folder written by ``save_pretrained`` (as the
reward recipe writes) loads the same way.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pickalign.reward.data import to_rgb
from pickalign.reward.sources import require

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
TEXT_CACHE_SIZE = 16384  # prompts whose embeddings a frozen reward keeps (ViT-H: 4 KB each)
ImageLike = Image.Image | np.ndarray | torch.Tensor


def _features(output) -> torch.Tensor:
    """Projected embeddings from get_*_features: a tensor in transformers 4, an output object
    whose ``pooler_output`` holds them in transformers 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def text_embeddings(model, input_ids, attention_mask=None) -> torch.Tensor:
    """L2-normalised prompt embeddings, (B, D)."""
    features = _features(
        model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
    )
    return F.normalize(features.float(), dim=-1)


def image_embeddings(model, pixel_values) -> torch.Tensor:
    """L2-normalised image embeddings, (B, D)."""
    return F.normalize(
        _features(model.get_image_features(pixel_values=pixel_values)).float(), dim=-1
    )


def to_pil(image: ImageLike) -> Image.Image:
    """PIL, HWC numpy or CHW tensor (uint8 in [0, 255], or floats in [0, 1]) -> an RGB PIL
    image."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, torch.Tensor) and not image.is_floating_point():
        if image.dtype != torch.uint8:
            raise ValueError(
                f"an image tensor of {image.dtype}: give uint8 in [0, 255] or floats in [0, 1]"
            )
        array = image.detach().cpu().numpy()
    elif isinstance(image, torch.Tensor):
        array = image.detach().cpu().float().numpy()
    else:
        array = image
    if isinstance(image, torch.Tensor) and array.ndim == 3 and array.shape[0] in (1, 3, 4):
        array = array.transpose(1, 2, 0)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return to_rgb(Image.fromarray(array))


def _bicubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """PIL's bicubic kernel (a = -0.5; torch's bicubic uses -0.75)."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


@lru_cache(maxsize=64)
def resize_weights(in_size: int, out_size: int, device: str = "cpu") -> torch.Tensor:
    """(out, in) matrix of PIL's antialiased bicubic resampling along one axis: downscaling
    widens the kernel by the scale factor, so every input pixel contributes. Cached per device,
    so a GPU batch does not wait on a host-to-device copy."""
    scale = in_size / out_size
    widen = max(scale, 1.0)
    support = 2.0 * widen
    weights = np.zeros((out_size, in_size))
    for i in range(out_size):
        centre = (i + 0.5) * scale
        first = max(int(centre - support + 0.5), 0)
        last = min(int(centre + support + 0.5), in_size)
        taps = _bicubic((np.arange(first, last) - centre + 0.5) / widen)
        weights[i, first:last] = taps / taps.sum()
    return torch.from_numpy(weights).float().to(device)


def same_size_float_tensors(images: Sequence[ImageLike]) -> bool:
    """Whether ``images`` are all (3, H, W) floating-point tensors of one size."""
    shapes = {
        tuple(image.shape)
        if isinstance(image, torch.Tensor) and image.is_floating_point()
        else None
        for image in images
    }
    return len(shapes) == 1 and None not in shapes and len(next(iter(shapes))) == 3


@lru_cache(maxsize=1)
def host_pool() -> ThreadPoolExecutor:
    """Threads that turn images into uint8 arrays for the device path (numpy, and PIL from
    Pillow 13 on, release the GIL while copying pixels)."""
    return ThreadPoolExecutor(
        max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="pickscore"
    )


@lru_cache(maxsize=1)
def pipeline_pool() -> ThreadPoolExecutor:
    """One thread that stages the next batch's pixels while the device embeds this one."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="pickscore-stage")


class PickScore:
    """A preference reward: higher score = more likely to be preferred for the prompt.

    ``preprocess`` chooses where images become CLIP pixel values: ``"processor"`` runs the CLIP
    processor on the CPU (the model card's way), ``"device"`` uploads uint8 pixels and resizes,
    crops and normalises them on ``device`` (``preprocess_tensor``: float instead of the
    processor's uint8 rounding), ``"auto"`` picks the device on a GPU, where the processor would
    be the bottleneck. A frozen reward on a GPU keeps its weights in ``dtype`` (bf16 by default).
    ``compile=True`` puts the vision tower under ``torch.compile``: the first batches of each
    size are slow, later ones faster (ViT-H/14 on an H100: 1316 instead of 1138 images/s).
    """

    def __init__(
        self,
        model,
        processor,
        device: str | torch.device | None = None,
        dtype=None,
        freeze=True,
        preprocess: str = "auto",
        compile: bool = False,
    ):
        if preprocess not in ("auto", "processor", "device"):
            raise ValueError(f"preprocess must be auto, processor or device, got {preprocess!r}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        on_gpu = self.device.type == "cuda"
        # Half precision only where it pays off; on CPU bf16 autocast is opt-in via dtype.
        self.dtype = dtype or (torch.bfloat16 if on_gpu else torch.float32)
        self.preprocess = (
            preprocess if preprocess != "auto" else "device" if on_gpu else "processor"
        )
        self._logit_scale = None
        if freeze:  # a reward is frozen; validation during training scores the live model
            model = model.eval().requires_grad_(False)
            if on_gpu and self.dtype in (torch.bfloat16, torch.float16):
                # half weights: no per-forward casts under autocast, half the memory; the score
                # scale stays fp32 (bf16 would round exp(logit_scale) = 100 by up to 0.4%)
                self._logit_scale = model.logit_scale.detach().float().exp().to(self.device)
                model = model.to(self.dtype)
        self.model = model.to(self.device)
        self.processor = processor
        self.max_length = processor.tokenizer.model_max_length
        self._warned_truncation = False
        self.frozen, self._text_cache = freeze, {}
        if compile:
            self.model.vision_model.compile()
        image_processor = processor.image_processor
        self._mean_std = [
            torch.tensor(v, device=self.device).view(1, 3, 1, 1)
            for v in (image_processor.image_mean, image_processor.image_std)
        ]

    def logit_scale(self) -> torch.Tensor:
        """exp(logit_scale) in fp32, the factor from cosine similarity to score."""
        if self._logit_scale is not None:
            return self._logit_scale
        return self.model.logit_scale.exp().float()

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path = PICKSCORE_MODEL,
        processor: str | Path | None = None,
        device=None,
        dtype=None,
    ) -> PickScore:
        """Load from a Hub id or a local folder. The processor defaults to the model's own
        folder when it has one, else to PickScore's (``laion/CLIP-ViT-H-14``)."""
        from transformers import CLIPModel, CLIPProcessor

        require(str(model), "clip", "reward model")
        if processor is None:
            local = Path(model)
            has_own = (local / "preprocessor_config.json").exists() or (
                local / "processor_config.json"
            ).exists()
            processor = model if has_own or str(model) != PICKSCORE_MODEL else PICKSCORE_PROCESSOR
        return cls(
            CLIPModel.from_pretrained(model, dtype=torch.float32),
            CLIPProcessor.from_pretrained(processor),
            device,
            dtype,
        )

    # ------------------------------------------------------------------------------------------
    # batched scoring

    def _autocast(self):
        enabled = self.dtype in (torch.bfloat16, torch.float16)
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=enabled)

    def _tokens(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        tokens = self.processor.tokenizer(
            list(prompts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        if not self._warned_truncation:
            lengths = self.processor.tokenizer(list(prompts), truncation=False).input_ids
            if any(len(ids) > self.max_length for ids in lengths):
                warnings.warn(
                    f"a prompt is longer than {self.max_length} tokens; it was truncated",
                    stacklevel=3,
                )
                self._warned_truncation = True
        return {k: v.to(self.device) for k, v in tokens.items()}

    def _text_per_image(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompt embeddings (N, D), one row per image, each distinct prompt encoded once. A
        frozen reward keeps them across calls (up to ``TEXT_CACHE_SIZE`` prompts, oldest out):
        an online run scores the same prompts round after round. They are made outside
        inference mode, so ``differentiable`` can multiply them into a graph."""
        distinct = list(dict.fromkeys(prompts))
        if not self.frozen:
            with torch.no_grad(), self._autocast():
                text = text_embeddings(self.model, **self._tokens(distinct))
            row = {prompt: i for i, prompt in enumerate(distinct)}
            return text[[row[p] for p in prompts]]
        missing = [p for p in distinct if p not in self._text_cache]
        if missing:
            with torch.inference_mode(False), torch.no_grad(), self._autocast():
                text = text_embeddings(self.model, **self._tokens(missing))
            self._text_cache.update(zip(missing, text))
        rows = torch.stack([self._text_cache[p] for p in prompts])
        while len(self._text_cache) > TEXT_CACHE_SIZE:  # after use: a call may hold more
            self._text_cache.pop(next(iter(self._text_cache)))
        return rows

    @torch.inference_mode()
    def embed_images(
        self, images: Sequence[ImageLike], batch_size: int | None = None
    ) -> torch.Tensor:
        """L2-normalised image embeddings (N, D), in batches of ``batch_size``.

        Default batch: 8 on a CPU, where the vision tower runs faster in small batches (ViT-B/16,
        2 cores: 3.4 images/s at batch 8, 2.8 at batch 64); on a GPU 64, or half the images of a
        smaller call, so that with device preprocessing the host prepares one batch's pixels
        while the GPU embeds the previous one.
        """
        if batch_size is None:
            on_gpu = self.device.type == "cuda"
            batch_size = min(64, max(8, -(-len(images) // 2))) if on_gpu else 8
        batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
        if self.preprocess == "device" and same_size_float_tensors(images):
            # decoded images already in [0, 1] (e.g. a pipeline's output_type="pt"): no host trip
            pixel_batches = (
                self.preprocess_tensor(torch.stack(list(b)).to(self.device).clamp(0, 1), (0.0, 1.0))
                for b in batches
            )
        elif self.preprocess == "device":
            pixel_batches = (self.upload_pixels(groups) for groups in self._staged_ahead(batches))
        else:
            pixel_batches = (self.processor_pixels(batch) for batch in batches)
        chunks = []
        for pixels in pixel_batches:
            with self._autocast():
                chunks.append(image_embeddings(self.model, pixels))
        return torch.cat(chunks)

    def _staged_ahead(self, batches):
        """``stage_pixels`` of each batch, the next one staged on a thread while the caller
        works on the current one (one batch ahead, so host memory stays bounded)."""
        pool = pipeline_pool()
        pending = pool.submit(self.stage_pixels, batches[0]) if batches else None
        for k in range(len(batches)):
            staged = pending.result()
            if k + 1 < len(batches):
                pending = pool.submit(self.stage_pixels, batches[k + 1])
            yield staged

    def processor_pixels(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """CLIP pixel values from the processor on the CPU, as the model card makes them."""
        pils = [to_pil(image) for image in images]
        pixels = self.processor.image_processor(images=pils, return_tensors="pt").pixel_values
        return pixels.to(self.device)

    def device_pixels(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """CLIP pixel values made on the device (``stage_pixels``, then ``upload_pixels``)."""
        return self.upload_pixels(self.stage_pixels(images))

    def stage_pixels(self, images: Sequence[ImageLike]) -> list[tuple[list[int], torch.Tensor]]:
        """The host half of device preprocessing: RGB uint8 pixels of same-size images stacked
        in (pinned, on a GPU) host memory, as (indices, (n, H, W, 3)) per size."""
        pool = host_pool()
        arrays = list(pool.map(lambda image: np.asarray(to_pil(image)), images))
        groups: dict[tuple[int, int], list[int]] = {}
        for i, array in enumerate(arrays):
            groups.setdefault(array.shape[:2], []).append(i)
        staged = []
        for (height, width), members in groups.items():
            host = torch.empty(
                (len(members), height, width, 3),
                dtype=torch.uint8,
                pin_memory=self.device.type == "cuda",
            )
            view = host.numpy()
            list(pool.map(np.copyto, view, [arrays[i] for i in members]))
            staged.append((members, host))
        return staged

    def upload_pixels(self, staged: list[tuple[list[int], torch.Tensor]]) -> torch.Tensor:
        """The device half: one upload per size (asynchronous from pinned memory), then
        ``preprocess_tensor``; returns the pixel values in the images' original order."""
        pin = self.device.type == "cuda"
        values = []
        for _, host in staged:
            pixels = host.to(self.device, non_blocking=pin).permute(0, 3, 1, 2)
            values.append(self.preprocess_tensor(pixels, value_range=(0.0, 255.0)))
        if len(staged) == 1:
            return values[0]
        order = torch.tensor([i for members, _ in staged for i in members])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order))
        inverse = (inverse.pin_memory() if pin else inverse).to(self.device, non_blocking=pin)
        return torch.cat(values)[inverse]

    @torch.inference_mode()
    def score(
        self,
        prompts: str | Sequence[str],
        images: Sequence[ImageLike],
        batch_size: int | None = None,
    ) -> torch.Tensor:
        """Scores (N,) of ``images[i]`` for ``prompts[i]`` (or for the one prompt given).

        Each distinct prompt is encoded once, however many images it scores; images go through
        the vision tower in batches of ``batch_size`` (default: see ``embed_images``).
        """
        prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
        text = self._text_per_image(prompts)
        return (self.logit_scale() * (text * self.embed_images(images, batch_size)).sum(-1)).cpu()

    def probs(self, prompt: str, images: Sequence[ImageLike]) -> torch.Tensor:
        """Probability (N,) that each candidate is the one preferred for ``prompt``."""
        return self.score(prompt, images).softmax(dim=0)

    # ------------------------------------------------------------------------------------------
    # differentiable scoring

    def preprocess_tensor(self, pixels: torch.Tensor, value_range=(-1.0, 1.0)) -> torch.Tensor:
        """(B, 3, H, W) decoded images -> CLIP pixel values, with differentiable ops only:
        bicubic antialiased resize of the short side (PIL's filter, as the processor uses),
        centre crop, CLIP normalisation."""
        low, high = value_range
        pixels = (pixels.float() - low) / (high - low)  # -> [0, 1]
        processor = self.processor.image_processor
        size = processor.size["shortest_edge"]
        crop_h, crop_w = processor.crop_size["height"], processor.crop_size["width"]
        height, width = pixels.shape[-2:]
        if height <= width:  # the processor's output size: short side = size, long side floored
            new_h, new_w = size, int(size * width / height)
        else:
            new_h, new_w = int(size * height / width), size
        rows = resize_weights(height, new_h, str(pixels.device))  # (new_h, H)
        cols = resize_weights(width, new_w, str(pixels.device))  # (new_w, W)
        pixels = rows @ pixels @ cols.T  # (B, 3, new_h, new_w)
        top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2
        pixels = pixels[..., top : top + crop_h, left : left + crop_w]
        mean, std = (v.to(pixels.device) for v in self._mean_std)
        return (pixels - mean) / std

    def differentiable(
        self, prompts: str | Sequence[str], pixels: torch.Tensor, value_range=(-1.0, 1.0)
    ) -> torch.Tensor:
        """Scores (B,) of decoded image tensors that carry gradients back to ``pixels``."""
        prompts = [prompts] * len(pixels) if isinstance(prompts, str) else list(prompts)
        text = self._text_per_image(prompts)
        values = self.preprocess_tensor(pixels.to(self.device), value_range)
        with self._autocast():
            images = image_embeddings(self.model, values)
        return self.logit_scale() * (text * images).sum(-1)
