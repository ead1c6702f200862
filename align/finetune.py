"""Settings and setup shared by the UNet fine-tuning methods: the base pipeline, LoRA or full
mode, precision, the reference model, the optimizer and its schedule, EMA, resuming. Each
method's config adds its own fields to ``UNetTuneConfig``."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

import torch

from pickalign.align.lora import (
    DEFAULT_TARGETS,
    adapters_disabled,
    add_lora,
    lora_parameters,
    skip_lora_input_casts,
)
from pickalign.align.models import load_parts, unet_forward
from pickalign.align.release import keep_only_lora
from pickalign.config import RunConfig
from pickalign.runtime import make_optimizer, maybe_resume

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class UNetTuneConfig(RunConfig):
    model: str = field(
        default="stable-diffusion-v1-5/stable-diffusion-v1-5",
        metadata={"help": "Base pipeline to fine-tune: a Hub id or a local folder."},
    )
    vae: str | None = field(
        default=None, metadata={"help": "Another VAE, e.g. madebyollin/sdxl-vae-fp16-fix."}
    )
    vae_dtype: str = field(
        default="fp32",
        metadata={"choices": ("fp32", "bf16", "fp16"), "help": "VAE precision: fp32, bf16, fp16."},
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision of the model."})
    variant: str | None = field(default=None, metadata={"help": "Weight variant, e.g. 'fp16'."})
    mode: str = field(
        default="lora",
        metadata={"choices": ("lora", "full"), "help": "'lora' or 'full' UNet fine-tuning."},
    )
    lora_rank: int = field(default=8, metadata={"range": "> 0", "help": "LoRA rank."})
    lora_alpha: float | None = field(
        default=None, metadata={"range": "> 0", "help": "LoRA alpha (default: rank)."}
    )
    lora_targets: list[str] = field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        metadata={"help": "UNet module names that get LoRA adapters."},
    )
    learning_rate: float = field(default=1e-8, metadata={"range": "> 0", "help": "Learning rate."})
    scale_lr: bool = field(
        default=False,
        metadata={
            "help": "Multiply the learning rate by the examples per optimizer step (all processes)."
        },
    )
    lr_scheduler: str = field(
        default="constant_with_warmup",
        metadata={
            "choices": (
                "linear",
                "cosine",
                "cosine_with_restarts",
                "polynomial",
                "constant",
                "constant_with_warmup",
            ),
            "help": "A diffusers scheduler name.",
        },
    )
    warmup_steps: int = field(
        default=500, metadata={"range": ">= 0", "help": "Learning-rate warmup steps."}
    )
    optimizer: str = field(
        default="adamw",
        metadata={
            "choices": ("adamw", "adamw_8bit", "adafactor"),
            "help": "'adamw', 'adamw_8bit' or 'adafactor'.",
        },
    )
    weight_decay: float = field(default=1e-2, metadata={"range": ">= 0", "help": "Weight decay."})
    max_grad_norm: float = field(
        default=1.0, metadata={"range": "> 0", "help": "Gradient clipping norm."}
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Trade compute for memory."}
    )


def accumulation_steps(per_step: int, batch_size: int, name: str) -> int:
    """Gradient accumulation that makes ``per_step`` examples per optimizer step over this
    launch's processes, ``batch_size`` per process per micro-batch."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if per_step % (batch_size * world):
        raise ValueError(
            f"{name} {per_step} is not a multiple of batch_size {batch_size} x {world} processes"
        )
    return per_step // (batch_size * world)


def _deepspeed(accelerator) -> bool:
    return accelerator.distributed_type.value == "DEEPSPEED"


def setup_unet(
    config: UNetTuneConfig,
    family: str,
    accelerator,
    reference: bool = False,
    offload_reference: bool = False,
):
    """Load the base model's parts and make its UNet trainable: LoRA adapters (the frozen base
    loads straight into half precision under mixed precision, no transient fp32 copy), or the
    whole UNet (fp32 master weights), with a frozen copy as the reference when ``reference``
    (kept on the CPU between uses with ``offload_reference``; in LoRA mode the reference is the
    same UNet with its adapters off, so no copy is made). Returns ``(parts, unet, trainable
    parameters, reference UNet or None, weight dtype)``."""
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
        accelerator.mixed_precision, torch.float32
    )
    unet_dtype = weight_dtype if config.mode == "lora" else torch.float32
    parts = load_parts(
        config.model,
        family,
        config.vae,
        config.revision,
        config.variant,
        unet_dtype=unet_dtype,
        vae_dtype=DTYPES[config.vae_dtype],
    )
    unet, reference_unet = parts.unet, None
    if config.mode == "lora":
        unet.to(accelerator.device)
        add_lora(unet, config.lora_rank, config.lora_alpha, config.lora_targets)
        if weight_dtype != torch.float32 and not _deepspeed(accelerator):
            skip_lora_input_casts(unet)  # every forward runs under accelerate's autocast
        trainable = lora_parameters(unet)
    else:
        trainable = list(unet.parameters())
    if reference and config.mode == "full":
        reference_unet = copy.deepcopy(unet).requires_grad_(False).eval()
        reference_unet.to("cpu" if offload_reference else accelerator.device)
        for module in reference_unet.modules():
            # Autocast runs normalisations in fp32, the policy's with its fp32 weights: the
            # reference's keep theirs (a few KB), so the two agree exactly at step 0.
            if not isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                for parameter in module.parameters(recurse=False):
                    parameter.data = parameter.data.to(weight_dtype)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    return parts, unet, trainable, reference_unet, weight_dtype


def scaled_learning_rate(config: UNetTuneConfig, batch_size: int, world: int) -> float:
    """The rate the optimizer uses: ``learning_rate``, times the examples per optimizer step
    over all ``world`` processes when ``scale_lr`` (the config itself keeps what was asked)."""
    if not config.scale_lr:
        return config.learning_rate
    return config.learning_rate * batch_size * config.gradient_accumulation_steps * world


def make_optimizer_and_schedule(
    config: UNetTuneConfig, trainable, accelerator, batch_size: int, total_steps: int | None = None
):
    """The optimizer over ``trainable`` at ``scaled_learning_rate`` and its diffusers
    learning-rate schedule over ``total_steps`` optimizer steps (default ``max_steps``)."""
    from diffusers.optimization import get_scheduler

    rate = scaled_learning_rate(config, batch_size, accelerator.num_processes)
    optimizer = make_optimizer(config.optimizer, trainable, rate, config.weight_decay)
    scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=config.warmup_steps * accelerator.num_processes,
        num_training_steps=(total_steps or config.max_steps) * accelerator.num_processes,
    )
    return optimizer, scheduler


def lora_reference(accelerator, unet):
    """The adapter-free UNet as the reference (same weights, no second copy)."""

    def reference(noisy, t, cond, time_ids):
        inner = accelerator.unwrap_model(unet)
        with adapters_disabled(inner), accelerator.autocast():
            return unet_forward(inner, noisy, t, cond, time_ids)

    return reference


def frozen_reference(accelerator, copy_unet, offload: bool):
    """A frozen copy of the initial UNet as the reference, optionally parked on the CPU."""
    device = accelerator.device

    def reference(noisy, t, cond, time_ids):
        if offload:
            copy_unet.to(device)
        try:
            with accelerator.autocast():
                return unet_forward(copy_unet, noisy, t, cond, time_ids)
        finally:
            if offload:
                copy_unet.to("cpu")

    return reference


def make_reference(accelerator, unet, reference_unet=None, offload: bool = False):
    """``reference(noisy, t, cond, time_ids)``: the adapter-free UNet in LoRA mode (no second
    copy), else the frozen copy ``reference_unet`` (optionally parked on the CPU)."""
    if reference_unet is None:
        return lora_reference(accelerator, unet)
    return frozen_reference(accelerator, reference_unet, offload)


def resume(accelerator, config: UNetTuneConfig) -> dict:
    """Restore ``resume_from_checkpoint``. In LoRA mode (without DeepSpeed) checkpoints hold the
    adapter, not a copy of the frozen UNet, and load non-strictly."""
    lora_only = config.mode == "lora" and not _deepspeed(accelerator)
    if lora_only:
        accelerator.register_save_state_pre_hook(keep_only_lora)
    return maybe_resume(accelerator, config, **({"strict": False} if lora_only else {}))
