"""Load the parts of an SD 1.x/2.x or SDXL pipeline for training, from a Hub id or a local folder,
and encode prompts for either family.

Only the UNet is meant to train; the VAE and the text encoders come back frozen in eval mode.
The VAE runs in fp32 unless told otherwise (SDXL's VAE overflows in fp16), and SDXL can take a
separate VAE (e.g. an fp16-safe one).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pickalign.align.text import encode_sd, encode_sdxl, sdxl_time_ids

FAMILIES = ("sd", "sdxl")


@dataclass
class Conditioning:
    """What the UNet is conditioned on, per prompt: the context sequence, and for SDXL the pooled
    embedding (time ids belong to the image, see ``pickalign.align.pairs``)."""

    context: torch.Tensor  # (B, 77, D)
    pooled: torch.Tensor | None = None  # (B, D2), SDXL only

    def index(self, rows) -> Conditioning:
        return Conditioning(self.context[rows], None if self.pooled is None else self.pooled[rows])

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        pooled = None if items[0].pooled is None else torch.cat([c.pooled for c in items])
        return Conditioning(torch.cat([c.context for c in items]), pooled)

    def to(self, device=None, dtype=None) -> Conditioning:
        pooled = None if self.pooled is None else self.pooled.to(device, dtype)
        return Conditioning(self.context.to(device, dtype), pooled)

    def repeat(self, n: int) -> Conditioning:
        """The batch repeated n times (one prompt's conditioning to a batch, or pairs to sides)."""
        pooled = None if self.pooled is None else self.pooled.repeat(n, 1)
        return Conditioning(self.context.repeat(n, 1, 1), pooled)


@dataclass
class DiffusionParts:
    family: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    noise_scheduler: object
    tokenizers: list = field(default_factory=list)
    text_encoders: list = field(default_factory=list)
    zeros_for_empty: bool = False  # see ``zeros_for_empty_prompt``

    def to(self, device, text_dtype=None) -> DiffusionParts:
        """Move the frozen VAE and text encoders (the VAE keeps its dtype)."""
        for encoder in self.text_encoders:
            encoder.to(device, dtype=text_dtype)
        self.vae.to(device)
        return self

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        if self.family == "sd":
            return Conditioning(encode_sd(self.tokenizers[0], self.text_encoders[0], prompts))
        return Conditioning(*encode_sdxl(self.tokenizers, self.text_encoders, prompts))

    def unconditional(self) -> Conditioning:
        """The unconditional branch of the pipeline's guidance, batch 1: what caption dropout,
        anchors and guided predictions train with (see ``unconditional``)."""
        return unconditional(self.encode_prompts([""]), self.zeros_for_empty)

    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell along a side: the VAE's downsampling (8 for SD's)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor):
        """(B, 3, H, W) in [-1, 1] -> scaled latents (the posterior mean)."""
        vae = self.vae
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean
        shift = vae.config.get("shift_factor") or 0.0
        return (latents - shift) * vae.config.scaling_factor


def zeros_for_empty_prompt(pipeline_config) -> bool:
    """Whether a pipeline samples the unconditional branch of classifier-free guidance from zeroed
    embeddings (context and pooled) instead of the encoded empty prompt.

    ``pipeline_config`` is the pipeline's own config (``model_index.json``, or ``pipe.config``).
    SDXL pipelines set ``force_zeros_for_empty_prompt`` (true for SDXL, which dropped captions to
    zeros in training); where the key is absent, the pipeline class's default decides, as it does
    when diffusers loads the pipeline. SD 1.x/2.x pipelines always encode "".
    """
    import inspect

    import diffusers

    if "force_zeros_for_empty_prompt" in pipeline_config:
        return bool(pipeline_config["force_zeros_for_empty_prompt"])
    pipeline_class = getattr(diffusers, str(pipeline_config.get("_class_name")), None)
    if pipeline_class is None:
        return False
    default = inspect.signature(pipeline_class.__init__).parameters.get(
        "force_zeros_for_empty_prompt"
    )
    return bool(default.default) if default is not None else False


def unconditional(empty: Conditioning, zeros: bool) -> Conditioning:
    """The one rule for the unconditional embedding in training: zeros shaped like the empty
    prompt's embeddings ``empty`` where the pipeline forces zeros (``zeros_for_empty_prompt``),
    else ``empty`` itself. Training it any other way trains a branch the pipeline never samples."""
    if not zeros:
        return empty
    pooled = None if empty.pooled is None else torch.zeros_like(empty.pooled)
    return Conditioning(torch.zeros_like(empty.context), pooled)


def detect_family(model: str, revision: str | None = None) -> str:
    """'sdxl' when the UNet of ``model`` has SDXL's text-and-time conditioning, else 'sd'."""
    from diffusers import UNet2DConditionModel

    return unet_family(UNet2DConditionModel.load_config(model, subfolder="unet", revision=revision))


def unet_family(unet_config) -> str:
    """'sdxl' for a UNet config with SDXL's text-and-time conditioning, else 'sd'."""
    return "sdxl" if unet_config.get("addition_embed_type") == "text_time" else "sd"


def load_parts(
    model: str,
    family: str | None = None,
    vae: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
    unet_dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype = torch.float32,
) -> DiffusionParts:
    """UNet, VAE, DDPM noise scheduler, tokenizer(s) and text encoder(s) of ``model``.

    ``vae`` names another VAE (Hub id or folder holding a VAE's config, or a pipeline folder with
    a ``vae`` subfolder). ``family`` is checked against the UNet when given.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    found = detect_family(model, revision)
    if family is not None and family != found:
        raise ValueError(
            f"{model} holds an {found.upper()} UNet but the recipe trains {family.upper()}; "
            f"use recipes/dpo_{found}.py"
        )
    common = dict(revision=revision, variant=variant)
    unet = UNet2DConditionModel.from_pretrained(
        model, subfolder="unet", torch_dtype=unet_dtype, **common
    )
    vae_model = (
        _load_vae(vae, revision, vae_dtype)
        if vae
        else AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=vae_dtype, **common)
    )
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler", revision=revision)
    tokenizers = [AutoTokenizer.from_pretrained(model, subfolder="tokenizer", revision=revision)]
    encoders = [CLIPTextModel.from_pretrained(model, subfolder="text_encoder", **common)]
    if found == "sdxl":
        tokenizers.append(
            AutoTokenizer.from_pretrained(model, subfolder="tokenizer_2", revision=revision)
        )
        encoders.append(
            CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder_2", **common)
        )
    for part in (vae_model, *encoders):
        part.requires_grad_(False).eval()
    zeros = zeros_for_empty_prompt(_pipeline_config(model, revision, found))
    return DiffusionParts(found, unet, vae_model, scheduler, tokenizers, encoders, zeros)


def parts_from_pipeline(pipe) -> DiffusionParts:
    """The parts of a loaded diffusers SD or SDXL pipeline (with any LoRA it has loaded), for
    ``pickalign.align.sampler``; its own scheduler's config gives the noise schedule."""
    from diffusers import DDPMScheduler

    family = unet_family(pipe.unet.config)
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if family == "sdxl" else [])
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    return DiffusionParts(
        family,
        pipe.unet,
        pipe.vae,
        DDPMScheduler.from_config(pipe.scheduler.config),
        tokenizers,
        encoders,
        zeros_for_empty_prompt(dict(pipe.config)),
    )


def _pipeline_config(model: str, revision: str | None, family: str) -> dict:
    """``model_index.json`` of ``model``; a folder of bare parts counts as the family's pipeline."""
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(model, revision=revision)
    except OSError:
        name = "StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline"
        return {"_class_name": name}


def _load_vae(name: str, revision: str | None, dtype: torch.dtype):
    from diffusers import AutoencoderKL

    try:
        return AutoencoderKL.from_pretrained(name, revision=revision, torch_dtype=dtype)
    except OSError:  # a pipeline folder or repo: its vae subfolder
        return AutoencoderKL.from_pretrained(
            name, subfolder="vae", revision=revision, torch_dtype=dtype
        )


def unet_forward(unet, noisy, timesteps, cond: Conditioning, time_ids: torch.Tensor | None):
    """One UNet prediction for either family; ``time_ids`` (B, 6) is SDXL's micro-conditioning."""
    if cond.pooled is None:
        return unet(noisy, timesteps, encoder_hidden_states=cond.context).sample
    added = {"text_embeds": cond.pooled, "time_ids": time_ids}
    return unet(
        noisy, timesteps, encoder_hidden_states=cond.context, added_cond_kwargs=added
    ).sample


def default_time_ids(size: int, batch: int) -> torch.Tensor:
    """Time ids of an uncropped square image of ``size`` px, (batch, 6)."""
    return sdxl_time_ids((size, size), (0, 0), (size, size)).expand(batch, 6)
