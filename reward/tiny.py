"""A tiny CLIP with PickScore's architecture (``CLIPModel`` + ``CLIPProcessor``), built from a
config and saved with ``save_pretrained``, so tests and the demo load it through the same
``from_pretrained`` code a Hub id such as ``yuvalkirstain/PickScore_v1`` takes."""

from __future__ import annotations

from pathlib import Path

import torch

from pickalign.reward.tokenizer import MAX_LENGTH, build_clip_tokenizer


def tiny_clip_config(image_size: int = 32, width: int = 32, layers: int = 2, projection: int = 32):
    from transformers import CLIPConfig

    text = dict(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=width * 2,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        projection_dim=projection,
    )
    vision = dict(
        image_size=image_size,
        patch_size=image_size // 4,
        hidden_size=width,
        intermediate_size=width * 2,
        num_hidden_layers=layers,
        num_attention_heads=2,
        projection_dim=projection,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection)


def build_tiny_clip(folder: str | Path, image_size: int = 32, seed: int = 0, **config) -> Path:
    """Save a randomly initialised tiny ``CLIPModel`` and its ``CLIPProcessor`` to ``folder``."""
    return save_new_clip(folder, tiny_clip_config(image_size=image_size, **config), seed)


def save_new_clip(folder: str | Path, config, seed: int = 0) -> Path:
    """A randomly initialised ``CLIPModel`` of ``config`` (a ``CLIPConfig``) and its
    ``CLIPProcessor`` (CLIP's normalisation and bicubic resize at the vision tower's size, the real
    CLIP tokenizer), saved to ``folder``."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor

    folder = Path(folder)
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    tokenizer = build_clip_tokenizer(folder)
    size = config.vision_config.image_size
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        resample=3,  # bicubic, as CLIP's own preprocessing
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder
