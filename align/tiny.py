"""Tiny SD-style and SDXL-style pipelines built from configs with the real diffusers and
transformers classes, saved with ``save_pretrained`` so that tests and the demo load them with
``StableDiffusion[XL]Pipeline.from_pretrained(folder)``, the code path a Hub id takes.

The 4-level VAE keeps the real scale factor of 8 (64 px images, 8x8 latents).
"""

from __future__ import annotations

from pathlib import Path

import torch

from pickalign.reward.tokenizer import build_clip_tokenizer


def _text_encoder(width: int, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=width * 2,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        projection_dim=width,
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def tiny_vae(levels: int = 4, width: int = 8):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(width * min(2**i, 4) for i in range(levels)),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=width,
        sample_size=64,
    )


def tiny_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )


def tiny_sd_components(seed: int = 0) -> dict:
    """Components of a tiny SD 1.x-style pipeline (one CLIP text encoder, 32-d context)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    return dict(unet=unet, vae=tiny_vae(), text_encoder=_text_encoder(32))


def tiny_sdxl_components(seed: int = 0) -> dict:
    """Components of a tiny SDXL-style pipeline: two text encoders whose hidden states are
    concatenated (32 + 32 = 64-d context), pooled embeddings and time ids as added conditions."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        # pooled text embedding (32) + six time ids embedded to time_embed_dim each
        projection_class_embeddings_input_dim=32 + 6 * time_embed_dim,
        norm_num_groups=32,
    )
    return dict(
        unet=unet,
        vae=tiny_vae(),
        text_encoder=_text_encoder(32),
        text_encoder_2=_text_encoder(32, projection=True),
    )


def build_tiny_sd(folder: str | Path, seed: int = 0) -> Path:
    """Save a randomly initialised tiny ``StableDiffusionPipeline`` to ``folder``."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    pipe = StableDiffusionPipeline(
        **tiny_sd_components(seed),
        tokenizer=build_clip_tokenizer(folder / "_tokenizer"),
        scheduler=tiny_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    save_pipeline(pipe, folder)
    _remove_tree(folder / "_tokenizer")
    return folder


def build_tiny_sdxl(folder: str | Path, seed: int = 0) -> Path:
    """Save a randomly initialised tiny ``StableDiffusionXLPipeline`` to ``folder``."""
    from diffusers import StableDiffusionXLPipeline

    folder = Path(folder)
    tokenizer = build_clip_tokenizer(folder / "_tokenizer")
    pipe = StableDiffusionXLPipeline(
        **tiny_sdxl_components(seed),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        scheduler=tiny_scheduler(),
    )
    save_pipeline(pipe, folder)
    _remove_tree(folder / "_tokenizer")
    return folder


def save_pipeline(pipe, folder: str | Path) -> None:
    """``pipe.save_pretrained(folder)``, in the layout every transformers release that pickalign
    supports reads. transformers 5 saves a ``CLIPTextModel`` built from a config without its
    ``text_model.`` key prefix and a CLIP tokenizer as ``tokenizer.json`` alone; transformers 4
    then loads a randomly initialised text encoder with only a warning, and its slow
    ``CLIPTokenizer`` cannot read the folder. So the keys get their prefix back (the layout of
    the Hub's checkpoints, which transformers 5 reads as well) and the pipeline names the
    tokenizer class that reads ``tokenizer.json`` in both (``CLIPTokenizerFast``)."""
    import json

    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    pipe.save_pretrained(folder)
    for weights in folder.glob("text_encoder*/model.safetensors"):
        config = json.loads((weights.parent / "config.json").read_text())
        state = load_file(weights)
        if config.get("architectures") == ["CLIPTextModel"] and not any(
            key.startswith("text_model.") for key in state
        ):
            state = {f"text_model.{key}": value for key, value in state.items()}
            save_file(state, weights, metadata={"format": "pt"})
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text())
    for name, entry in index.items():
        if name.startswith("tokenizer") and entry == ["transformers", "CLIPTokenizer"]:
            if not (folder / name / "vocab.json").exists():
                index[name] = ["transformers", "CLIPTokenizerFast"]
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
