"""Batched, seeded sampling from a diffusers text-to-image pipeline.

One image per (prompt, seed); the same seed gives the same starting noise for any model of the
same latent shape, so two models can be compared image by image.
"""

from __future__ import annotations

import torch
from PIL import Image

from align.models import Conditioning


def generate(
    pipe,
    prompts: list[str],
    seeds: list[int],
    steps: int = 20,
    guidance_scale: float = 5.0,
    size: int | None = None,
    batch_size: int = 50,
    progress: bool = False,
    conditioning: tuple[Conditioning, Conditioning] | None = None,
) -> list[Image.Image]:
    """Images for ``prompts[i]`` from seed ``seeds[i]``. ``conditioning``: embeddings to sample
    with instead of the pipeline's own prompt encoding, (one row per prompt, the unconditional
    branch as one row)."""
    from tqdm.auto import tqdm

    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    size = size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    pipe.set_progress_bar_config(disable=True)
    images = []
    for start in tqdm(range(0, len(prompts), batch_size), disable=not progress, desc="sampling"):
        chunk = slice(start, start + batch_size)
        generators = [torch.Generator(pipe.device).manual_seed(s) for s in seeds[chunk]]
        if conditioning is None:
            inputs = {"prompt": prompts[chunk]}
        else:
            cond, uncond = conditioning[0].index(chunk), conditioning[1]
            uncond = uncond.repeat(len(cond.context))
            inputs = {"prompt_embeds": cond.context, "negative_prompt_embeds": uncond.context}
            if cond.pooled is not None:
                inputs["pooled_prompt_embeds"] = cond.pooled
                inputs["negative_pooled_prompt_embeds"] = uncond.pooled
        images += pipe(
            **inputs,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            height=size,
            width=size,
            generator=generators,
        ).images
    return images
