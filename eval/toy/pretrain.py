"""Pretrain the toy world's base generators: an SD-style or SDXL-style tiny pipeline built from
the real diffusers classes, trained on renders of the *train* prompts so that it follows
held-out prompts only partly. That imperfect base is what alignment has to improve.

Two stages, each resumable with ``--resume_from_checkpoint latest``:

1. VAE (3 levels, 32 px <-> 8x8x4 latents), trained to reconstruct renders of every attribute
   combination; it only has to keep what the oracle reads. ``--vae_from`` reuses a trained one.
2. UNet (epsilon prediction) on cached latents of train-prompt renders, with caption dropout for
   classifier-free guidance. The small CLIP text encoder(s) start random and train with the UNet
   (``--train_text_encoder false`` keeps them frozen: conditioning is then learned far slower).

The result is saved with ``save_pretrained`` under ``<output_dir>/pipeline`` and evaluated with the
oracle on the held-out test prompts (``<output_dir>/metrics.json``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pickalign.align.models import Conditioning, unconditional, zeros_for_empty_prompt
from pickalign.align.text import sd_context, sdxl_context, sdxl_time_ids, tokenize
from pickalign.align.tiny import save_pipeline
from pickalign.config import RunConfig
from pickalign.eval.toy.judge import judged_adherence, sample_held_out
from pickalign.reward.toyworld import IMAGE_SIZE, all_attributes, prompt_splits, render
from pickalign.runtime import (
    atomic_path,
    atomic_write_json,
    check_finite,
    make_accelerator,
    make_optimizer,
    maybe_resume,
    progress_bar,
    save_checkpoint,
    seed_everything,
    warmup_schedule,
    write_config,
)

LATENT_SIZE = IMAGE_SIZE // 4
VALIDATION_FILE = "pretraining_validation.json"  # in the saved pipeline folder


@dataclass
class PretrainToyConfig(RunConfig):
    family: str = field(
        default="sd", metadata={"choices": ("sd", "sdxl"), "help": "'sd' (SD 1.x-style) or 'sdxl'."}
    )
    vae_from: str | None = field(
        default=None, metadata={"help": "A trained toy VAE folder to reuse (skips stage 1)."}
    )
    vae_steps: int = field(default=1000, metadata={"range": "> 0", "help": "VAE optimizer steps."})
    vae_batch_size: int = field(
        default=32, metadata={"range": "> 0", "help": "VAE images per step."}
    )
    vae_learning_rate: float = field(
        default=1e-3, metadata={"range": "> 0", "help": "VAE AdamW learning rate."}
    )
    vae_kl_weight: float = field(
        default=1e-6, metadata={"range": ">= 0", "help": "KL weight: near-deterministic."}
    )
    vae_pool: int = field(
        default=6000, metadata={"range": "> 0", "help": "Renders the VAE trains on."}
    )
    renders_per_prompt: int = field(
        default=48,
        metadata={"range": "> 0", "help": "Renders per train prompt cached as UNet latents."},
    )
    batch_size: int = field(default=64, metadata={"range": "> 0", "help": "UNet latents per step."})
    learning_rate: float = field(
        default=1e-3, metadata={"range": "> 0", "help": "UNet AdamW peak learning rate."}
    )
    warmup_steps: int = field(
        default=100, metadata={"range": ">= 0", "help": "Linear warmup, then cosine decay."}
    )
    train_text_encoder: bool = field(
        default=True,
        metadata={"help": "Train the text encoder(s) with the UNet (frozen during alignment)."},
    )
    caption_dropout: float = field(
        default=0.1,
        metadata={
            "range": "[0, 1)",
            "help": "Share of captions dropped for guidance: to zeros where the pipeline forces zeros for an empty prompt (SDXL), else to ''.",
        },
    )
    unet_channels: list[int] = field(
        default_factory=lambda: [64, 128],
        metadata={"range": "> 0", "help": "UNet block widths (one per resolution level)."},
    )
    target_adherence: float = field(
        default=0.0,
        metadata={
            "range": "[0, 1]",
            "help": "Stop once this share of validation prompts gets every attribute right "
            "(0: train all max_steps). Builds a deliberately imperfect base.",
        },
    )
    adherence_check_steps: int = field(
        default=50,
        metadata={
            "range": "> 0",
            "help": "Check validation adherence every N steps (after warmup).",
        },
    )
    save_fp16: bool = field(
        default=True,
        metadata={"help": "Store UNet and VAE weights in fp16 (half the size; load as fp32)."},
    )
    eval_prompts: int = field(
        default=200, metadata={"range": "> 0", "help": "Held-out test prompts judged."}
    )
    eval_sampling_steps: int = field(
        default=20,
        metadata={"range": "> 0", "help": "DDIM steps when sampling for the final eval."},
    )
    guidance_scale: float = field(
        default=5.0, metadata={"range": ">= 1", "help": "CFG scale when sampling."}
    )


# ----------------------------------------------------------------------------------------------
# Model components


def toy_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
    )


def toy_unet(family: str, channels: list[int]):
    from diffusers import UNet2DConditionModel

    levels = len(channels)
    common = dict(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(channels),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * levels,
        up_block_types=("CrossAttnUpBlock2D",) * levels,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    if family == "sd":
        return UNet2DConditionModel(cross_attention_dim=32, **common)
    return UNet2DConditionModel(
        cross_attention_dim=64,  # both encoders' hidden states, concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,  # pooled (32) + 6 time ids
        use_linear_projection=True,
        **common,
    )


def toy_scheduler():
    """DDIM with "leading" spacing and steps_offset=1: sampling never starts at a signal-free
    timestep. The same scheduler as the tiny test pipelines."""
    from pickalign.align.tiny import tiny_scheduler

    return tiny_scheduler()


def text_components(family: str, folder: Path, seed: int) -> dict:
    from pickalign.align.tiny import _text_encoder
    from pickalign.reward.tokenizer import build_clip_tokenizer

    torch.manual_seed(seed + 1000)
    tokenizer = build_clip_tokenizer(folder / "tokenizer")
    parts = {"tokenizer": tokenizer, "text_encoder": _text_encoder(32).eval()}
    if family == "sdxl":
        parts["tokenizer_2"] = tokenizer
        parts["text_encoder_2"] = _text_encoder(32, projection=True).eval()
    return parts


class ToyDenoiser(torch.nn.Module):
    """UNet plus text encoder(s) as one module, so the encoders can train with the UNet and a
    single ``accelerator.prepare`` covers both. ``forward`` predicts the noise from token ids."""

    def __init__(self, family: str, unet, text: dict, zeros_for_empty: bool):
        super().__init__()
        self.family, self.unet, self.zeros_for_empty = family, unet, zeros_for_empty
        self.text_encoders = torch.nn.ModuleList(
            [text["text_encoder"]] + ([text["text_encoder_2"]] if family == "sdxl" else [])
        )
        time_ids = sdxl_time_ids((IMAGE_SIZE, IMAGE_SIZE), (0, 0), (IMAGE_SIZE, IMAGE_SIZE))
        self.register_buffer("time_ids", time_ids, persistent=False)

    def conditioning(self, ids, dropped=None) -> Conditioning:
        """Embeddings of token ids (B, 77); rows marked in ``dropped`` (B,) bool had their caption
        dropped (their ids encode "") and get the pipeline's unconditional embedding."""
        if self.family == "sd":
            cond = Conditioning(sd_context(self.text_encoders[0], ids))
        else:  # one shared tokenizer
            cond = Conditioning(*sdxl_context(self.text_encoders, [ids, ids]))
        if dropped is None:
            return cond
        uncond = unconditional(cond, self.zeros_for_empty)
        context = torch.where(dropped[:, None, None], uncond.context, cond.context)
        if cond.pooled is None:
            return Conditioning(context)
        return Conditioning(context, torch.where(dropped[:, None], uncond.pooled, cond.pooled))

    def forward(self, noisy, timesteps, ids, dropped=None):  # (B, 4, 8, 8), (B,), (B, 77)
        cond = self.conditioning(ids, dropped)
        if self.family == "sd":
            return self.unet(noisy, timesteps, cond.context).sample
        added = {"text_embeds": cond.pooled, "time_ids": self.time_ids.expand(len(noisy), 6)}
        return self.unet(noisy, timesteps, cond.context, added_cond_kwargs=added).sample


def to_tensor(images) -> torch.Tensor:
    """PIL RGB images -> (B, 3, H, W) in [-1, 1]."""
    array = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1


def render_pool(attributes, count: int, seed: int) -> tuple[torch.Tensor, list[int]]:
    """``count`` renders cycling through ``attributes``: (N, 3, 32, 32) and attribute indices."""
    rng = np.random.default_rng(seed)
    index = [i % len(attributes) for i in range(count)]
    return to_tensor([render(attributes[i], rng) for i in index]), index


# ----------------------------------------------------------------------------------------------
# Training


def train_vae(config: PretrainToyConfig, folder: Path) -> Path:
    """Stage 1: train and save the VAE to ``folder``; returns it. Resumable."""

    if (folder / "config.json").exists():
        return folder
    stage = RunConfig(**{**vars(_run_fields(config)), "output_dir": str(folder.parent / "vae_run")})
    stage.max_steps = config.vae_steps
    accelerator = make_accelerator(stage, project="toy_vae")
    seed_everything(config.seed, accelerator)
    pool, _ = render_pool(all_attributes(), config.vae_pool, config.seed)
    torch.manual_seed(config.seed)
    vae = toy_vae()
    optimizer = make_optimizer("adamw", vae.parameters(), config.vae_learning_rate, 1e-2)
    scheduler = warmup_schedule(optimizer, 50, config.vae_steps, "cosine")
    vae, optimizer, scheduler = accelerator.prepare(vae, optimizer, scheduler)
    start = maybe_resume(accelerator, stage)["step"]
    bar = progress_bar(accelerator, config.vae_steps, start, desc="vae")
    for step in range(start + 1, config.vae_steps + 1):
        batch = pool[torch.randint(len(pool), (config.vae_batch_size,))].to(accelerator.device)
        posterior = accelerator.unwrap_model(vae).encode(batch).latent_dist
        recon = accelerator.unwrap_model(vae).decode(posterior.sample()).sample
        loss = F.mse_loss(recon, batch) + config.vae_kl_weight * posterior.kl().mean()
        check_finite(loss, step)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % config.logging_steps == 0:
            accelerator.log({"vae/loss": loss.item()}, step=step)
        if config.checkpointing_steps and step % config.checkpointing_steps == 0:
            save_checkpoint(accelerator, stage, step)
    bar.close()
    vae = accelerator.unwrap_model(vae).eval()
    with torch.no_grad():  # scale latents to unit variance, as SD's scaling_factor does
        vae.register_to_config(scaling_factor=1.0)
        latents = cache_latents(vae, pool[:1024])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    if accelerator.is_main_process:
        with atomic_path(folder) as tmp:
            vae.save_pretrained(tmp)
    accelerator.end_training()
    return folder


def _run_fields(config: PretrainToyConfig) -> RunConfig:
    return RunConfig(**{f: getattr(config, f) for f in RunConfig.__dataclass_fields__})


def vae_round_trip(folder: str | Path):
    """A function mapping PIL images to their reconstructions through the VAE in ``folder``."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder).eval()

    @torch.no_grad()
    def round_trip(images):
        latents = cache_latents(vae, to_tensor(images)) / vae.config.scaling_factor
        decoded = torch.cat(
            [vae.decode(latents[i : i + 256]).sample for i in range(0, len(latents), 256)]
        )
        array = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        return [Image.fromarray(a) for a in array]

    return round_trip


@torch.no_grad()
def cache_latents(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Scaled posterior-mean latents, (N, 4, 8, 8)."""
    chunks = [
        vae.encode(images[i : i + batch]).latent_dist.mean for i in range(0, len(images), batch)
    ]
    return torch.cat(chunks) * vae.config.scaling_factor


def train(config: PretrainToyConfig) -> Path:
    """Both stages, then save the pipeline and judge it on held-out prompts. Returns the pipeline folder."""
    from diffusers import AutoencoderKL, DDPMScheduler

    out = Path(config.output_dir)
    started = time.time()
    vae_folder = Path(config.vae_from) if config.vae_from else train_vae(config, out / "vae")
    vae = AutoencoderKL.from_pretrained(vae_folder).eval().requires_grad_(False)

    accelerator = make_accelerator(config, project=f"toy_{config.family}")
    write_config(config, out)
    seed_everything(config.seed, accelerator)
    text = text_components(config.family, out / "text", config.seed)
    train_prompts = prompt_splits()["train"]
    images, prompt_index = render_pool(
        train_prompts, len(train_prompts) * config.renders_per_prompt, config.seed + 1
    )
    latents = cache_latents(vae, images)  # (N, 4, 8, 8)
    token_ids = tokenize(text["tokenizer"], [a.prompt for a in train_prompts] + [""])  # (P+1, 77)
    prompt_index = torch.tensor(prompt_index)
    empty = len(train_prompts)  # index of the "" prompt, for caption dropout
    # Dropped captions become what the saved pipeline samples its unconditional branch with.
    zeros = zeros_for_empty_prompt(assemble_pipeline(config.family, None, None, text).config)

    torch.manual_seed(config.seed)
    model = ToyDenoiser(config.family, toy_unet(config.family, config.unet_channels), text, zeros)
    model.requires_grad_(True)
    if not config.train_text_encoder:
        for encoder in model.text_encoders:
            encoder.requires_grad_(False)
    noise_scheduler = DDPMScheduler.from_config(toy_scheduler().config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer("adamw", trainable, config.learning_rate, 1e-2)
    scheduler = warmup_schedule(optimizer, config.warmup_steps, config.max_steps, "cosine")
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    start = maybe_resume(accelerator, config)["step"]
    bar = progress_bar(accelerator, config.max_steps, start, desc=f"unet ({config.family})")
    device = accelerator.device
    step = start
    for step in range(start + 1, config.max_steps + 1):
        pick = torch.randint(len(latents), (config.batch_size,))
        which = prompt_index[pick]
        dropped = torch.rand(len(which)) < config.caption_dropout
        which = torch.where(dropped, empty, which)
        x0 = latents[pick]
        noise = torch.randn_like(x0)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(x0),))
        noisy = noise_scheduler.add_noise(x0, noise, t)
        pred = model(
            noisy.to(device), t.to(device), token_ids[which].to(device), dropped.to(device)
        )
        loss = F.mse_loss(pred.float(), noise.to(device))
        check_finite(loss, step)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % config.logging_steps == 0:
            accelerator.log({"unet/loss": loss.item(), "lr": scheduler.get_last_lr()[0]}, step=step)
        if config.checkpointing_steps and step % config.checkpointing_steps == 0:
            save_checkpoint(accelerator, config, step)
        if (
            config.target_adherence
            and step > config.warmup_steps
            and step % config.adherence_check_steps == 0
        ):
            reached = validation_adherence(accelerator.unwrap_model(model), vae, text, config)
            accelerator.log({"val/all_correct": reached}, step=step)
            bar.set_postfix(loss=f"{loss.item():.4f}", val_all_correct=f"{reached:.2f}")
            if reached >= config.target_adherence:
                accelerator.print(f"validation adherence {reached:.2f} at step {step}: stopping")
                save_checkpoint(accelerator, config, step)
                break
    bar.close()
    minutes = (time.time() - started) / 60

    folder = out / "pipeline"
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(model)
        validation = {
            "prompts": "the 50 validation prompts, seed i for prompt i",
            "steps": config.eval_sampling_steps,
            "guidance_scale": config.guidance_scale,
            "unconditional": "zeros" if zeros else "the encoded empty prompt",
            "all_correct": validation_adherence(model, vae, text, config),
        }
        pipe = assemble_pipeline(config.family, model.unet, vae, text)
        if config.save_fp16:  # diffusers upcasts them to fp32 again on from_pretrained
            pipe.unet.to(torch.float16)
            pipe.vae.to(torch.float16)
        with atomic_path(folder) as tmp:
            save_pipeline(pipe, tmp)
            # What pretraining measured, sampling as trained: the stock pipeline must agree.
            atomic_write_json(Path(tmp) / VALIDATION_FILE, validation)
        metrics = evaluate_base(
            folder, config.eval_prompts, config.eval_sampling_steps, config.guidance_scale
        )
        metrics["validation_all_correct"] = validation["all_correct"]
        metrics["train_minutes"] = round(minutes, 1)
        metrics["steps"] = step
        atomic_write_json(out / "metrics.json", metrics)
        accelerator.print(f"pipeline: {folder}\nmetrics: {metrics}")
    accelerator.end_training()
    return folder


@torch.no_grad()
def validation_adherence(model: ToyDenoiser, vae, text: dict, config: PretrainToyConfig) -> float:
    """Share of the 50 validation prompts (seed i for prompt i) with every attribute right,
    sampled as trained: prompts and the unconditional branch embedded by ``model.conditioning``,
    so this measures what training taught. ``tests/test_toy_models.py`` checks that the stock
    pipeline samples the shipped bases the same way."""
    model.eval()
    pipe = assemble_pipeline(config.family, model.unet, vae, text)
    prompts = [a.prompt for a in prompt_splits()["validation"]]
    device = model.time_ids.device
    cond = model.conditioning(tokenize(text["tokenizer"], prompts).to(device))
    dropped = torch.ones(1, dtype=torch.bool, device=device)
    uncond = model.conditioning(tokenize(text["tokenizer"], [""]).to(device), dropped)
    sampled = sample_held_out(
        pipe,
        "validation",
        len(prompts),
        steps=config.eval_sampling_steps,
        guidance_scale=config.guidance_scale,
        conditioning=(cond, uncond),
    )
    model.train()
    return judged_adherence(*sampled)["all_correct"]


def evaluate_base(folder: Path, prompts: int, steps: int, guidance_scale: float) -> dict:
    """Oracle adherence of a saved toy pipeline on the first ``prompts`` held-out test prompts
    (seed i for prompt i), sampled by the stock pipeline."""
    pipe = load_toy_pipeline(folder)
    return judged_adherence(*sample_held_out(pipe, "test", prompts, 1, steps, guidance_scale))


def load_toy_pipeline(folder: str | Path):
    """Load a saved toy pipeline; ``DiffusionPipeline`` picks the SD or SDXL class."""
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(folder)


def assemble_pipeline(family: str, unet, vae, text: dict):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if family == "sd":
        return StableDiffusionPipeline(
            unet=unet,
            vae=vae,
            scheduler=toy_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            **text,
        )
    return StableDiffusionXLPipeline(unet=unet, vae=vae, scheduler=toy_scheduler(), **text)
