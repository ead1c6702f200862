"""Diffusion-DPO (Wallace et al. 2023) for SD 1.x/2.x and SDXL UNets on Pick-a-Pic pairs.

Winner and loser of a pair are noised with the same noise at the same timestep; the loss
(``align.losses.diffusion_dpo_loss``) compares how much better the policy denoises the winner than
the loser, relative to a frozen reference. Two modes:

- ``lora`` (default): the reference is the same UNet with its adapters switched off, so no second
  UNet sits in memory; the output is a diffusers-format LoRA.
- ``full``: the whole UNet trains against a frozen copy (optionally kept on the CPU between
  uses); the output is a diffusers UNet folder.

With ``cache_dir`` the VAE latents and prompt embeddings are computed once (``align.pairs``) and a
training step touches only the UNet. Runs through ``accelerate launch`` on one or many GPUs, with
DDP or DeepSpeed (ZeRO-2 for LoRA, ZeRO-3 for full fine-tuning), and resumes with
``--resume_from_checkpoint latest``.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from align.lora import (
    DEFAULT_TARGETS,
    adapters_disabled,
    add_lora,
    lora_parameters,
    save_lora,
    skip_lora_input_casts,
)
from align.losses import diffusion_dpo_loss, per_sample_mse, prediction_target
from align.models import FAMILIES, Conditioning, load_parts, unet_forward
from align.pairs import CachedPairs, PreferencePairs, build_cache, collate_pairs
from reward.data import PairFilter, load_pickapic
from reward.runtime import (
    ConfigError,
    EpochSampler,
    RunConfig,
    append_log,
    atomic_path,
    atomic_write_json,
    check_finite,
    make_accelerator,
    maybe_resume,
    progress_bar,
    save_checkpoint,
    seed_everything,
    write_config,
)
from reward.sources import require

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class DPOConfig(RunConfig):
    model: str = field(
        default="stable-diffusion-v1-5/stable-diffusion-v1-5",
        metadata={"help": "Base pipeline to align: a Hub id or a local folder."},
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
    dataset: str = field(
        default="yuvalkirstain/pickapic_v2", metadata={"help": "Pick-a-Pic Hub id or local folder."}
    )
    dataset_build: str | None = field(
        default=None,
        metadata={
            "help": "The command that builds a local dataset (the toy configs set it): a missing "
            "dataset is then reported with it, never looked up on the Hub."
        },
    )
    split: str = field(default="train", metadata={"help": "Dataset split to train on."})
    keep_ties: bool = field(
        default=False, metadata={"help": "Train on ties too (target 0.5 instead of a winner)."}
    )
    skip_bad_rows: bool = field(
        default=False, metadata={"help": "Skip and count bad rows instead of stopping."}
    )
    max_pairs: int | None = field(
        default=None, metadata={"range": "> 0", "help": "Use only the first N usable pairs."}
    )
    resolution: int = field(
        default=512, metadata={"range": "> 0", "help": "Training resolution (square)."}
    )
    random_crop: bool = field(default=False, metadata={"help": "Random instead of centre crop."})
    random_flip: bool = field(default=False, metadata={"help": "Flip half the pairs."})
    caption_dropout: float = field(
        default=0.0,
        metadata={
            "range": "[0, 1)",
            "help": "Share of pairs trained unconditionally, with the embedding the pipeline's "
            "guidance uses: zeros where it forces zeros for an empty prompt (SDXL), else ''.",
        },
    )
    uncond_anchor: float = field(
        default=0.0,
        metadata={
            "range": ">= 0",
            "help": "With caption_dropout: the unconditional pairs keep the policy's prediction at "
            "the reference's with this weight instead of training DPO (0: DPO, as the paper).",
        },
    )
    timestep_bias: float = field(
        default=1.0,
        metadata={
            "range": "> 0",
            "help": "Exponent k of the timestep draw t = T * u^(1/k), u uniform: 1 is the paper's "
            "uniform draw; k > 1 trains noisier timesteps more (density grows as t^(k-1)), "
            "where shape and layout are decided (a pickalign option).",
        },
    )
    loss: str = field(
        default="dpo",
        metadata={"choices": ("dpo", "sft"), "help": "'dpo', or 'sft' (MSE on winners only)."},
    )
    beta: float = field(default=5000.0, metadata={"range": "> 0", "help": "Diffusion-DPO beta."})
    train_guidance: float = field(
        default=1.0,
        metadata={
            "range": ">= 1",
            "help": "Compare guided predictions in the DPO loss: u_ref + s * (c - u_ref) for policy "
            "and reference, with u_ref the reference's unconditional prediction, so the "
            "loss sees what sampling at guidance s sees. Costs one more reference forward per "
            "step (1: off, the paper's conditional prediction; a pickalign option).",
        },
    )
    winner_penalty: float = field(
        default=0.0,
        metadata={
            "range": ">= 0",
            "help": "DPO-Positive lambda: the margin also loses lambda * max(0, mse_policy(winner) "
            "- mse_reference(winner)), so winners cannot get less likely than under the "
            "reference (0: DPO, as the paper; a pickalign option).",
        },
    )
    ema_decay: float = field(
        default=0.0,
        metadata={
            "range": "[0, 1)",
            "help": "Keep an exponential moving average of the trained weights (the LoRA, or the "
            "UNet in full mode) with this decay, e.g. 0.99, and validate, checkpoint-release and "
            "save it instead of the last weights (0: off). Its early steps average faster "
            "(decay (1+n)/(10+n) until that is higher). Holds a second copy of the trained "
            "weights. Not with DeepSpeed ZeRO-3.",
        },
    )
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
    reference_offload: bool = field(
        default=False,
        metadata={"help": "Full mode: keep the reference UNet on the CPU between uses."},
    )
    batch_size: int = field(
        default=1, metadata={"range": "> 0", "help": "Pairs per process per micro-batch."}
    )
    pairs_per_step: int | None = field(
        default=None,
        metadata={
            "range": "> 0",
            "help": "Pairs per optimizer step over all processes; sets the accumulation.",
        },
    )
    learning_rate: float = field(default=1e-8, metadata={"range": "> 0", "help": "Learning rate."})
    scale_lr: bool = field(
        default=False, metadata={"help": "Multiply the learning rate by the pairs per step."}
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
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "Precompute VAE latents and prompt embeddings here once (resumable)."},
    )
    cache_shard_size: int = field(
        default=1024, metadata={"range": "> 0", "help": "Pairs per cache shard."}
    )
    num_workers: int = field(
        default=0, metadata={"range": ">= 0", "help": "DataLoader worker processes."}
    )
    validation_split: str | None = field(
        default=None,
        metadata={
            "help": "Held-out split (e.g. 'validation') on which the DPO loss and implicit "
            "accuracy of the policy against the reference are logged every validation_steps "
            "and at the end (uniform timesteps, the same noise each time). 'none' or '' turns "
            "off a split a config file sets."
        },
    )
    validation_steps: int = field(
        default=0,
        metadata={
            "range": ">= 0",
            "help": "Validate every N optimizer steps (0: only at the end).",
        },
    )
    validation_pairs: int = field(
        default=512,
        metadata={"range": "> 0", "help": "Validate on at most this many held-out pairs."},
    )
    toy_eval_prompts: int = field(
        default=0,
        metadata={
            "range": ">= 0",
            "help": "Toy world: judge aligned vs base on this many held-out prompts at the end.",
        },
    )
    toy_eval_seeds: int = field(
        default=1, metadata={"range": "> 0", "help": "Toy world: seeds per prompt."}
    )
    toy_eval_split: str = field(
        default="test",
        metadata={
            "choices": ("test", "validation"),
            "help": "Toy world: judge on 'test' prompts, or 'validation' to choose settings.",
        },
    )
    sample_steps: int = field(
        default=20, metadata={"range": "> 0", "help": "Sampling steps of the evaluation."}
    )
    guidance_scale: float = field(
        default=5.0, metadata={"range": ">= 1", "help": "Guidance of the evaluation."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.train_guidance != 1 and self.loss != "dpo":
            raise ConfigError(
                f"train_guidance: got {self.train_guidance}, but it applies to loss dpo only "
                f"(loss is {self.loss!r}); leave it at 1"
            )


# ----------------------------------------------------------------------------------------------
# One step, shared by every mode


def draw_timesteps(n: int, steps: int, generator=None, bias: float = 1.0) -> torch.Tensor:
    """n training timesteps in [0, steps): uniform for ``bias`` 1, else T * u^(1/bias), whose
    density grows as t^(bias - 1): bias > 1 favours noisy timesteps, where composition is set."""
    if bias == 1.0:
        return torch.randint(0, steps, (n,), generator=generator)
    u = torch.rand(n, generator=generator)
    return (u.pow(1.0 / bias) * steps).long().clamp_max(steps - 1)


def pair_step(unet, reference, scheduler, latents, cond: Conditioning, time_ids, *,
              beta: float, loss_type: str = "dpo", labels=None, generator=None,
              anchor=None, anchor_weight: float = 0.0, timestep_bias: float = 1.0,
              winner_penalty: float = 0.0, guidance: float = 1.0, uncond=None) -> dict:  # fmt: skip
    """Diffusion-DPO loss of a batch of pairs.

    ``latents`` (B, 2, C, h, w) winner first; ``cond`` per pair; ``time_ids`` (B, 2, 6) or None;
    ``reference(noisy, t, cond, time_ids)`` gives the reference prediction. Winner and loser
    share noise and timestep, drawn from ``generator`` (a CPU generator) when given.

    ``anchor`` (B,) bool, optional: pairs (those given the unconditional embedding) that instead keep the
    policy's prediction at the reference's, weighted by ``anchor_weight``, so the unconditional
    branch that classifier-free guidance subtracts does not drift. Returns the loss and the
    logged figures. ``timestep_bias`` k draws t = T * u^(1/k) (1: uniform, as the paper);
    ``winner_penalty`` is DPO-Positive's lambda (``align.losses.diffusion_dpo_loss``).

    ``guidance`` s > 1 with ``uncond`` (the unconditional ``Conditioning``, batch 1): the DPO
    terms compare the guided predictions ``u_ref + s * (c - u_ref)`` of policy and reference,
    where ``u_ref`` is the reference's unconditional prediction (one more no-grad forward). The
    anchor still compares the plain predictions.
    """
    b, device = latents.shape[0], latents.device
    both = latents.transpose(0, 1).flatten(0, 1)  # (2B, ...): winners, then losers
    noise = torch.randn(latents[:, 0].shape, generator=generator).to(device, latents.dtype)
    noise = noise.repeat(2, 1, 1, 1)
    steps = scheduler.config.num_train_timesteps
    t = draw_timesteps(b, steps, generator, timestep_bias).to(device).repeat(2)
    noisy = scheduler.add_noise(both, noise, t)
    target = prediction_target(scheduler, both, noise, t)
    cond2 = cond.repeat(2)
    ids = None if time_ids is None else time_ids.transpose(0, 1).flatten(0, 1)
    prediction = unet_forward(unet, noisy, t, cond2, ids)
    mse_w, mse_l = per_sample_mse(prediction, target).chunk(2)
    if loss_type == "sft":
        return {"loss": mse_w.mean(), "mse_winner": mse_w.detach().mean()}
    with torch.no_grad():
        reference_prediction = reference(noisy, t, cond2, ids)
        if guidance != 1:  # a call of its own keeps the conditional batch equal to the policy's
            reference_uncond = reference(noisy, t, uncond.repeat(2 * b), ids)
    plain_mse_w = mse_w.detach().mean()
    if guidance == 1:
        ref_w, ref_l = per_sample_mse(reference_prediction, target).chunk(2)
    else:
        guided = reference_uncond + guidance * (prediction - reference_uncond)
        guided_reference = reference_uncond + guidance * (reference_prediction - reference_uncond)
        mse_w, mse_l = per_sample_mse(guided, target).chunk(2)
        ref_w, ref_l = per_sample_mse(guided_reference, target).chunk(2)
    keep = torch.ones(b, dtype=torch.bool, device=device) if anchor is None else ~anchor.to(device)
    if keep.all():
        terms = diffusion_dpo_loss(mse_w, mse_l, ref_w, ref_l, beta, labels, winner_penalty)
        figures = {}
    else:
        kept_labels = None if labels is None else labels.to(device)[keep]
        terms = diffusion_dpo_loss(mse_w[keep], mse_l[keep], ref_w[keep], ref_l[keep], beta,
                                   kept_labels, winner_penalty)  # fmt: skip
        drift = per_sample_mse(prediction, reference_prediction)[(~keep).repeat(2)].mean()
        figures = {"anchor_mse": drift.detach()}
        dpo = terms.loss if keep.any() else torch.zeros((), device=device)  # all anchored
        terms.loss = dpo + anchor_weight * drift
    return {
        "loss": terms.loss,
        "implicit_accuracy": terms.implicit_accuracy,
        "model_diff": terms.model_diff.mean(),
        "reference_diff": terms.reference_diff.mean(),
        "winner_drift": terms.winner_drift.mean(),
        "mse_winner": plain_mse_w,
        **figures,
    }


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


# ----------------------------------------------------------------------------------------------
# Setup


def resolve_accumulation(config: DPOConfig) -> None:
    """Turn ``pairs_per_step`` into gradient accumulation for this launch's world size."""
    if not config.pairs_per_step:
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_micro = config.batch_size * world
    if config.pairs_per_step % per_micro:
        raise ValueError(
            f"pairs_per_step {config.pairs_per_step} is not a multiple of batch_size "
            f"{config.batch_size} x {world} processes"
        )
    config.gradient_accumulation_steps = config.pairs_per_step // per_micro


def make_optimizer(parameters, config: DPOConfig):
    parameters = list(parameters)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(
            parameters, lr=config.learning_rate, weight_decay=config.weight_decay
        )
    if config.optimizer == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(parameters, lr=config.learning_rate,
                                   weight_decay=config.weight_decay)  # fmt: skip
    if config.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(parameters, lr=config.learning_rate, weight_decay=config.weight_decay,
                         relative_step=False, scale_parameter=False, warmup_init=False)  # fmt: skip
    raise ValueError(f"optimizer must be adamw, adamw_8bit or adafactor, got {config.optimizer!r}")


def make_dataset(config: DPOConfig, parts, accelerator, held_out: str | None = None):
    """The training pairs (``config.split``, with its augmentation), or with ``held_out`` that
    split's pairs for validation (centre-cropped, unflipped, at most ``validation_pairs``); as
    raw pairs, or their precompute cache (built on the main process first if missing; a
    held-out split's cache sits beside the training one as ``<cache_dir>-<split>``)."""
    training = held_out is None
    split = config.split if training else held_out
    rows = load_pickapic(config.dataset, split, streaming=False)
    crop, flip = (config.random_crop, config.random_flip) if training else (False, False)
    pairs = PreferencePairs(
        rows, config.resolution, PairFilter(keep_ties=config.keep_ties), config.skip_bad_rows,
        crop, flip, config.seed,
    )  # fmt: skip
    limit = config.max_pairs if training else config.validation_pairs
    if limit:
        pairs.index = pairs.index[:limit]
    if not config.cache_dir:
        return pairs
    cache_dir = config.cache_dir if training else f"{config.cache_dir.rstrip('/')}-{split}"
    if accelerator.is_main_process:
        parts.to(accelerator.device)
        describe = {"model": config.model, "vae": config.vae, "dataset": config.dataset,
                    "split": split, "resolution": config.resolution,
                    "random_crop": crop, "random_flip": flip,
                    "keep_ties": config.keep_ties, "max_pairs": limit}  # fmt: skip
        build_cache(parts, pairs, cache_dir, config.cache_shard_size,
                    describe=describe, progress=accelerator.is_local_main_process)  # fmt: skip
    accelerator.wait_for_everyone()
    cache = CachedPairs(cache_dir)
    cache.report = pairs.report.with_bad_rows(cache.bad_rows)
    return cache


@torch.no_grad()
def validate(unet, reference, noise_scheduler, dataset, parts, *, config: DPOConfig, family: str,
             device, uncond=None) -> dict[str, float]:  # fmt: skip
    """DPO loss, implicit accuracy and winner drift (``mse_θ(w) - mse_ref(w)``) of the policy
    against the reference on held-out pairs.

    Timesteps are drawn uniformly and the noise of batch k comes from a fixed seed, so every
    validation of a run sees the same draws and its figures compare across steps. Every process
    evaluates all pairs (the same figures on each; a sharded UNet needs all ranks in step).
    """
    cached = isinstance(dataset, CachedPairs)
    was_training = unet.training
    unet.eval()
    sums, count = {"loss": 0.0, "implicit_accuracy": 0.0, "winner_drift": 0.0}, 0
    for k, start in enumerate(range(0, len(dataset), config.batch_size)):
        end = min(start + config.batch_size, len(dataset))
        batch = collate_pairs([dataset[i] for i in range(start, end)])
        if "prompt" not in batch:  # only bad rows
            continue
        latents, cond, time_ids = batch_inputs(batch, parts, cached, device)
        generator = torch.Generator().manual_seed(hash((config.seed, -1, k)) % 2**63)
        figures = pair_step(
            unet, reference, noise_scheduler, latents, cond, time_ids if family == "sdxl" else None,
            beta=config.beta, labels=batch.get("labels"), generator=generator,
            guidance=config.train_guidance, uncond=uncond,
        )  # fmt: skip
        for key in sums:
            sums[key] += float(figures[key]) * len(latents)
        count += len(latents)
    unet.train(was_training)
    if count == 0:
        raise ValueError(f"validation split {config.validation_split!r} has no usable pairs")
    return {**{f"val/{key}": total / count for key, total in sums.items()}, "val/pairs": count}


def check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")


# ----------------------------------------------------------------------------------------------
# Training


def train(config: DPOConfig, family: str) -> Path:
    """Train; write ``<output_dir>/final`` (LoRA or UNet, model card, metrics). Returns it."""
    from diffusers.optimization import get_scheduler

    check_family(family)
    require(config.model, "pipeline", "model")
    require(config.dataset, "dataset", "dataset", config.dataset_build)
    started = time.time()
    resolve_accumulation(config)
    accelerator = make_accelerator(
        config, micro_batch_size=config.batch_size, project=f"dpo_{family}"
    )
    out = Path(config.output_dir)
    if accelerator.is_main_process:
        write_config(config, out)
    seed_everything(config.seed, accelerator)
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
        accelerator.mixed_precision, torch.float32
    )
    # LoRA mode loads the frozen base weights straight into half precision (no transient fp32
    # copy in host memory); full mode trains fp32 master weights.
    unet_dtype = weight_dtype if config.mode == "lora" else torch.float32
    parts = load_parts(config.model, family, config.vae, config.revision, config.variant,
                       unet_dtype=unet_dtype, vae_dtype=DTYPES[config.vae_dtype])  # fmt: skip
    unet = parts.unet
    reference_unet = None
    deepspeed = accelerator.distributed_type.value == "DEEPSPEED"
    if config.mode == "lora":
        unet.to(accelerator.device)
        add_lora(unet, config.lora_rank, config.lora_alpha, config.lora_targets)
        if weight_dtype != torch.float32 and not deepspeed:
            skip_lora_input_casts(unet)  # every forward runs under accelerate's autocast
        trainable = lora_parameters(unet)
    else:
        reference_unet = copy.deepcopy(unet).requires_grad_(False).eval()
        reference_unet.to("cpu" if config.reference_offload else accelerator.device, weight_dtype)
        trainable = list(unet.parameters())
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()

    dataset = make_dataset(config, parts, accelerator)
    accelerator.print(f"training data: {dataset.report.one_line()}")
    held_out = (
        make_dataset(config, parts, accelerator, config.validation_split)
        if config.validation_split
        else None
    )
    cached = isinstance(dataset, CachedPairs)
    if cached:
        uncond = {k: v.to(accelerator.device) for k, v in dataset.unconditional().items()}
        uncond = Conditioning(uncond["context"], uncond.get("pooled"))
        del parts.vae, parts.text_encoders  # a cached step touches only the UNet
    else:
        parts.to(accelerator.device, text_dtype=weight_dtype)
        uncond = parts.unconditional()
    if len(dataset) < config.batch_size:
        raise ValueError(
            f"{len(dataset)} usable pairs is less than one batch of {config.batch_size}"
        )
    sampler = EpochSampler(len(dataset), config.seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=config.batch_size, sampler=sampler, drop_last=True,
        collate_fn=collate_pairs, num_workers=config.num_workers,
    )  # fmt: skip
    if config.scale_lr:
        config.learning_rate *= (
            config.batch_size * config.gradient_accumulation_steps * accelerator.num_processes
        )
    optimizer = make_optimizer(trainable, config)
    scheduler = get_scheduler(
        config.lr_scheduler, optimizer, num_warmup_steps=config.warmup_steps * accelerator.num_processes,
        num_training_steps=config.max_steps * accelerator.num_processes,
    )  # fmt: skip
    unet, optimizer, loader, scheduler = accelerator.prepare(unet, optimizer, loader, scheduler)
    if config.mode == "lora":
        reference = lora_reference(accelerator, unet)
    else:
        reference = frozen_reference(accelerator, reference_unet, config.reference_offload)

    ema = make_ema(accelerator, config, trainable)
    lora_only = config.mode == "lora" and not deepspeed
    if lora_only:  # checkpoints hold the adapter, not a copy of the frozen UNet
        accelerator.register_save_state_pre_hook(keep_only_lora)
    state = maybe_resume(accelerator, config, **({"strict": False} if lora_only else {}))
    step = state["step"]
    steps_per_epoch = len(loader) // config.gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise ValueError(
            f"{len(dataset)} pairs do not fill one optimizer step of "
            f"{config.batch_size * config.gradient_accumulation_steps} pairs per process"
        )
    noise_scheduler = parts.noise_scheduler
    bar = progress_bar(accelerator, config.max_steps, step, desc=f"dpo {family}")
    skipped, logs, micro, validation, bad_rows = 0, {}, 0, None, {}
    while step < config.max_steps:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch)
        batches = accelerator.skip_first_batches(
            loader, done_in_epoch * config.gradient_accumulation_steps
        )
        for batch in batches:
            bad_rows.update(batch.pop("bad_rows"))
            if "prompt" not in batch:  # every row of it was bad
                skipped += 1
                continue
            latents, cond, time_ids = batch_inputs(batch, parts, cached, accelerator.device)
            # Randomness from (seed, step, micro-batch, rank): a resumed run draws the same.
            generator = torch.Generator().manual_seed(
                hash((config.seed, step, micro, accelerator.process_index)) % 2**63
            )
            micro = (micro + 1) % config.gradient_accumulation_steps
            cond, dropped = drop_captions(cond, uncond, config.caption_dropout, generator)
            if family == "sd":
                time_ids = None
            with accelerator.accumulate(unet):
                figures = pair_step(
                    unet, reference, noise_scheduler, latents, cond, time_ids,
                    beta=config.beta, loss_type=config.loss, labels=batch.get("labels"),
                    generator=generator, anchor=dropped if config.uncond_anchor > 0 else None,
                    anchor_weight=config.uncond_anchor, timestep_bias=config.timestep_bias,
                    winner_penalty=config.winner_penalty, guidance=config.train_guidance,
                    uncond=uncond,
                )  # fmt: skip
                loss = figures["loss"]
                check_finite(loss, step + 1)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            if ema is not None:
                ema.step(trainable)
            step += 1
            bar.update(1)
            logs = {f"train/{k}": accelerator.reduce(v.detach().float(), "mean").item()
                    for k, v in figures.items()}  # fmt: skip
            logs["train/lr"] = scheduler.get_last_lr()[0]
            bar.set_postfix(loss=f"{logs['train/loss']:.4f}",
                            acc=f"{logs.get('train/implicit_accuracy', float('nan')):.2f}")  # fmt: skip
            append_log(accelerator, out, step, logs)
            if step % config.logging_steps == 0 or step == config.max_steps:
                accelerator.log(logs, step=step)
            if held_out is not None and (
                step == config.max_steps
                or (config.validation_steps and step % config.validation_steps == 0)
            ):
                with averaged_weights(ema, trainable):  # validate what would be released
                    validation = validate(unet, reference, noise_scheduler, held_out, parts,
                                          config=config, family=family, device=accelerator.device,
                                          uncond=uncond)  # fmt: skip
                accelerator.log(validation, step=step)
                append_log(accelerator, out, step, validation)
                if accelerator.is_main_process:
                    bar.write(  # a line above the progress bar, not through it
                        f"step {step}: validation loss {validation['val/loss']:.4f}, implicit "
                        f"accuracy {validation['val/implicit_accuracy']:.3f}, winner drift "
                        f"{validation['val/winner_drift']:+.2e} on {validation['val/pairs']} pairs"
                    )
            if config.checkpointing_steps and step % config.checkpointing_steps == 0:
                save_checkpoint(accelerator, config, step,
                                extra_files=release_writer(accelerator, unet, config, family,
                                                           ema, trainable))  # fmt: skip
            if step >= config.max_steps:
                break
    bar.close()
    accelerator.wait_for_everyone()
    final = out / "final"
    metrics = {
        "steps": step, "train_minutes": round((time.time() - started) / 60, 2),
        "world_size": accelerator.num_processes, "skipped_batches": skipped,
        "data": dataset.report.with_bad_rows(bad_rows).as_dict(),
        "distributed_type": accelerator.distributed_type.value,
        "final_loss": logs.get("train/loss"),
        "final_implicit_accuracy": logs.get("train/implicit_accuracy"),
    }  # fmt: skip
    if validation is not None:
        metrics["validation"] = {"split": config.validation_split, "step": step,
                                 **{k.split("/")[1]: v for k, v in validation.items()}}  # fmt: skip
    writer = release_writer(accelerator, unet, config, family, ema, trainable)
    if accelerator.is_main_process:
        with atomic_path(final) as tmp:
            writer(tmp)
            atomic_write_json(tmp / "metrics.json", metrics)
            (tmp / "README.md").write_text(model_card(config, family, metrics))
        accelerator.print(f"aligned {family.upper()} {config.mode}: {final}\n{metrics}")
    accelerator.end_training()
    return final


def keep_only_lora(models, weights, output_dir) -> None:
    """``save_state`` hook: keep only the LoRA tensors of each model's state dict."""
    for i, state in enumerate(weights):
        weights[i] = {k: v for k, v in state.items() if "lora_" in k}


def batch_inputs(batch, parts, cached: bool, device):
    """(latents (B, 2, C, h, w), conditioning, time_ids (B, 2, 6)) on ``device``."""
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


def release_writer(accelerator, unet, config: DPOConfig, family: str, ema=None, trainable=()):
    """A function writing the release artefact into a folder: the LoRA in diffusers format, or a
    diffusers UNet folder in full mode; with ``ema``, the moving average of ``trainable``.
    Gathers the weights on every process (ZeRO-3). With EMA the weights are read at write time,
    on the main process alone: EMA is refused under ZeRO-3, where gathering needs every process."""
    if ema is not None:

        def write_averaged(folder: Path) -> None:
            with averaged_weights(ema, trainable):
                release_writer(accelerator, unet, config, family)(folder)

        return write_averaged
    if config.mode == "full":
        state = accelerator.get_state_dict(unet)

        def write_unet(folder: Path) -> None:
            accelerator.unwrap_model(unet).save_pretrained(folder / "unet", state_dict=state)

        return write_unet
    inner = accelerator.unwrap_model(unet)

    def write_lora(folder: Path) -> None:
        save_lora(inner, folder, extra={"base_model": config.model, "beta": config.beta,
                                        "loss": config.loss})  # fmt: skip

    return write_lora


def make_ema(accelerator, config: DPOConfig, trainable):
    """The moving average of ``trainable`` (None without ``ema_decay``), registered so that
    checkpoints hold it and a resumed run continues it."""
    if not config.ema_decay:
        return None
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None and plugin.zero_stage == 3:
        raise ValueError("ema_decay does not work with DeepSpeed ZeRO-3 (each process holds only "
                         "a shard of the weights); use ZeRO-2, or ema_decay 0")  # fmt: skip
    from diffusers.training_utils import EMAModel

    ema = EMAModel(trainable, decay=config.ema_decay, foreach=True)
    accelerator.register_for_checkpointing(ema)
    return ema


@contextlib.contextmanager
def averaged_weights(ema, parameters):
    """Inside the block the parameters hold the moving average (unchanged without one)."""
    if ema is None:
        yield
        return
    ema.store(parameters)
    ema.copy_to(parameters)
    try:
        yield
    finally:
        ema.restore(parameters)


def model_card(config: DPOConfig, family: str, metrics: dict) -> str:
    pipeline = "StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline"
    lines = [
        "---", "library_name: diffusers", f"base_model: {config.model}",
        f"tags: [pickalign, diffusion-dpo, {'lora' if config.mode == 'lora' else 'unet'}, {family}]",
        "---", f"# Diffusion-DPO {'LoRA' if config.mode == 'lora' else 'UNet'} for `{config.model}`",
        "", f"Aligned with pickalign's Diffusion-DPO on `{config.dataset}` ({config.split}).", "",
        "```python", f"from diffusers import {pipeline}",
        f'pipe = {pipeline}.from_pretrained("{config.model}")',
    ]  # fmt: skip
    if config.mode == "lora":
        lines.append('pipe.load_lora_weights("path/to/this/folder")')
    else:
        lines += [
            "from diffusers import UNet2DConditionModel",
            'pipe.unet = UNet2DConditionModel.from_pretrained("path/to/this/folder/unet")',
        ]
    lines += ["```", "", "## Training", "",
              f"- loss: {config.loss}, beta {config.beta}, mode {config.mode}"
              + (f" (rank {config.lora_rank}, alpha {config.lora_alpha or config.lora_rank})"
                 if config.mode == "lora" else ""),
              f"- resolution {config.resolution}, lr {config.learning_rate}, "
              f"{config.batch_size * config.gradient_accumulation_steps} pairs per process per step",
              *([f"- released weights: moving average, decay {config.ema_decay}"]
                if config.ema_decay else []),
              "", "## Run", ""]  # fmt: skip
    lines += [f"- {key}: {value}" for key, value in metrics.items()]
    return "\n".join(lines) + "\n"


def main(family: str, args: list[str] | None = None) -> tuple[DPOConfig, Path]:
    """Entry point of ``recipes/dpo_<family>.py``: parse the config, train; returns both."""
    from reward.runtime import parse_config

    config = parse_config(DPOConfig, args)
    return config, train(config, family)
