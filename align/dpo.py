"""Diffusion-DPO (Wallace et al. 2023) for SD 1.x/2.x and SDXL UNets on Pick-a-Pic pairs.

Winner and loser of a pair are noised with the same noise at the same timestep; the loss
(``pickalign.align.losses.diffusion_dpo_loss``) compares how much better the policy denoises the winner than
the loser, relative to a frozen reference. Two modes:

- ``lora`` (default): the reference is the same UNet with its adapters switched off, so no second
  UNet sits in memory; the output is a diffusers-format LoRA.
- ``full``: the whole UNet trains against a frozen copy (optionally kept on the CPU between
  uses); the output is a diffusers UNet folder.

With ``cache_dir`` the VAE latents and prompt embeddings are computed once (``pickalign.align.pairs``) and a
training step touches only the UNet. Runs through ``accelerate launch`` on one or many GPUs, with
DDP or DeepSpeed (ZeRO-2 for LoRA, ZeRO-3 for full fine-tuning), and resumes with
``--resume_from_checkpoint latest``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from pickalign.align.dpo_config import DPOConfig
from pickalign.align.finetune import (
    accumulation_steps,
    make_optimizer_and_schedule,
    make_reference,
    resume,
    scaled_learning_rate,
    setup_unet,
)
from pickalign.align.losses import diffusion_dpo_loss, per_sample_mse, prediction_target
from pickalign.align.models import FAMILIES, Conditioning, unet_forward
from pickalign.align.pairs import (
    CachedPairs,
    batch_inputs,
    collate_pairs,
    drop_captions,
    make_pair_dataset,
)

__all__ = ["DPOConfig", "pair_step", "train", "validate"]
from pickalign.align.release import averaged_weights, make_ema, model_card, release_writer
from pickalign.reward.sources import require
from pickalign.runtime import (
    EpochBatches,
    EpochSampler,
    append_log,
    check_finite,
    make_accelerator,
    mean_figures,
    progress_bar,
    publish,
    save_checkpoint,
    seed_everything,
    write_config,
)

# ----------------------------------------------------------------------------------------------
# One step: noise, predict, reference, loss


def pair_step(
    unet,
    reference,
    scheduler,
    latents,
    cond: Conditioning,
    time_ids,
    *,
    beta: float,
    loss_type: str = "dpo",
    labels=None,
    generator=None,
    anchor=None,
    anchor_weight: float = 0.0,
) -> dict:
    """Diffusion-DPO loss of a batch of pairs, and the figures to log.

    ``latents`` (B, 2, C, h, w) winner first; ``cond`` per pair; ``time_ids`` (B, 2, 6) or None;
    ``reference(noisy, t, cond, time_ids)`` gives the reference prediction. Winner and loser
    share noise and timestep (uniform, as the paper), drawn from ``generator`` (CPU) when given.
    ``anchor`` (B,) bool: pairs given the unconditional embedding, which hold the policy's
    prediction at the reference's (weight ``anchor_weight``) instead of training DPO.
    """
    b, device = latents.shape[0], latents.device
    # Noise: the same noise and timestep for both images of a pair.
    both = latents.transpose(0, 1).flatten(0, 1)  # (2B, ...): winners, then losers
    noise = torch.randn(latents[:, 0].shape, generator=generator).to(device, latents.dtype)
    noise = noise.repeat(2, 1, 1, 1)
    steps = scheduler.config.num_train_timesteps
    t = torch.randint(0, steps, (b,), generator=generator).to(device).repeat(2)
    noisy = scheduler.add_noise(both, noise, t)
    target = prediction_target(scheduler, both, noise, t)
    cond2 = cond.repeat(2)
    ids = None if time_ids is None else time_ids.transpose(0, 1).flatten(0, 1)
    # Predict.
    prediction = unet_forward(unet, noisy, t, cond2, ids)
    mse_w, mse_l = per_sample_mse(prediction, target).chunk(2)
    if loss_type == "sft":
        return {"loss": mse_w.mean(), "mse_winner": mse_w.detach().mean()}
    # Reference.
    with torch.no_grad():
        reference_prediction = reference(noisy, t, cond2, ids)
    ref_w, ref_l = per_sample_mse(reference_prediction, target).chunk(2)
    # Loss.
    keep = torch.ones(b, dtype=torch.bool, device=device) if anchor is None else ~anchor.to(device)
    figures = {}  # a figure over no pair (none anchored, or all) is nan: left out of the logs
    if keep.all():
        terms = diffusion_dpo_loss(mse_w, mse_l, ref_w, ref_l, beta, labels)
        if anchor is not None:
            figures["anchor_mse"] = torch.tensor(float("nan"), device=device)
    else:
        kept_labels = None if labels is None else labels.to(device)[keep]
        terms = diffusion_dpo_loss(
            mse_w[keep], mse_l[keep], ref_w[keep], ref_l[keep], beta, kept_labels
        )
        drift = per_sample_mse(prediction, reference_prediction)[(~keep).repeat(2)].mean()
        figures["anchor_mse"] = drift.detach()
        dpo = terms.loss if keep.any() else torch.zeros((), device=device)  # all anchored
        terms.loss = dpo + anchor_weight * drift
    return {
        "loss": terms.loss,
        "implicit_accuracy": terms.implicit_accuracy,
        "model_diff": terms.model_diff.mean(),
        "reference_diff": terms.reference_diff.mean(),
        "winner_drift": terms.winner_drift.mean(),
        "mse_winner": mse_w.detach().mean(),
        **figures,
    }


# ----------------------------------------------------------------------------------------------
# Data and validation


@torch.no_grad()
def validate(unet, reference, noise_scheduler, dataset, parts, config: DPOConfig, family, device):
    """DPO loss, implicit accuracy and winner drift (``mse_θ(w) - mse_ref(w)``) of the policy
    against the reference on held-out pairs.

    The noise of batch k comes from a fixed seed, so every validation of a run sees the same
    draws and its figures compare across steps. Every process evaluates all pairs (the same
    figures on each; a sharded UNet needs all ranks in step).
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
            unet,
            reference,
            noise_scheduler,
            latents,
            cond,
            time_ids if family == "sdxl" else None,
            beta=config.beta,
            labels=batch.get("labels"),
            generator=generator,
        )
        for key in sums:
            sums[key] += float(figures[key]) * len(latents)
        count += len(latents)
    unet.train(was_training)
    if count == 0:
        raise ValueError(f"validation split {config.validation_split!r} has no usable pairs")
    return {**{f"val/{key}": total / count for key, total in sums.items()}, "val/pairs": count}


def release(accelerator, unet, config: DPOConfig, ema=None, trainable=()):
    info = {"base_model": config.model, "beta": config.beta, "loss": config.loss}
    return release_writer(accelerator, unet, config.mode, info, ema, trainable)


def card(config: DPOConfig, family: str, metrics: dict, world: int) -> str:
    training = [
        f"loss: {config.loss}, beta {config.beta}, resolution {config.resolution}",
        f"{config.batch_size * config.gradient_accumulation_steps} pairs per process per step",
    ]
    if config.ema_decay:
        training.append(f"released weights: moving average, decay {config.ema_decay}")
    source = f"`{config.dataset}` ({config.split})"
    rate = scaled_learning_rate(config, config.batch_size, world)
    return model_card("Diffusion-DPO", config, family, training, metrics, source, rate)


# ----------------------------------------------------------------------------------------------
# Training


def train(config: DPOConfig, family: str) -> Path:
    """Train; write ``<output_dir>/final`` (LoRA or UNet, model card, metrics). Returns it."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    require(config.model, "pipeline", "model")
    require(config.dataset, "dataset", "dataset", config.dataset_build)
    started = time.time()
    if config.pairs_per_step:
        config.gradient_accumulation_steps = accumulation_steps(
            config.pairs_per_step, config.batch_size, "pairs_per_step"
        )
    accelerator = make_accelerator(
        config, micro_batch_size=config.batch_size, project=f"dpo_{family}"
    )
    out = Path(config.output_dir)
    if accelerator.is_main_process:
        write_config(config, out)
    seed_everything(config.seed, accelerator)
    parts, unet, trainable, reference_unet, weight_dtype = setup_unet(
        config, family, accelerator, reference=True, offload_reference=config.reference_offload
    )

    dataset = make_pair_dataset(config, parts, accelerator)
    accelerator.print(f"training data: {dataset.report.one_line()}")
    held_out = None
    if config.validation_split:
        held_out = make_pair_dataset(
            config, parts, accelerator, config.validation_split, config.validation_pairs
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
        dataset,
        batch_size=config.batch_size,
        sampler=sampler,
        drop_last=True,
        collate_fn=collate_pairs,
        num_workers=config.num_workers,
    )
    optimizer, scheduler = make_optimizer_and_schedule(
        config, trainable, accelerator, config.batch_size
    )
    unet, optimizer, loader, scheduler = accelerator.prepare(unet, optimizer, loader, scheduler)
    reference = make_reference(accelerator, unet, reference_unet, config.reference_offload)
    ema = make_ema(accelerator, config.ema_decay, trainable)
    state = resume(accelerator, config)
    step = state["step"]
    if len(loader) < config.gradient_accumulation_steps:
        raise ValueError(
            f"{len(dataset)} pairs do not fill one optimizer step of "
            f"{config.batch_size * config.gradient_accumulation_steps} pairs per process"
        )
    batches = EpochBatches(accelerator, loader, "prompt", state, config.gradient_accumulation_steps)
    noise_scheduler = parts.noise_scheduler
    bar = progress_bar(accelerator, config.max_steps, step, desc=f"dpo {family}")
    logs, micro, validation = {}, 0, None
    sums, counts = {}, {}  # figures over the micro-batches of the optimizer step
    if step < config.max_steps:
        for batch in batches:
            latents, cond, time_ids = batch_inputs(batch, parts, cached, accelerator.device)
            # Randomness from (seed, step, micro-batch, rank): a resumed run draws the same.
            generator = torch.Generator().manual_seed(
                hash((config.seed, step, micro, accelerator.process_index)) % 2**63
            )
            micro += 1
            cond, dropped = drop_captions(cond, uncond, config.caption_dropout, generator)
            with accelerator.accumulate(unet):
                figures = pair_step(
                    unet,
                    reference,
                    noise_scheduler,
                    latents,
                    cond,
                    time_ids if family == "sdxl" else None,
                    beta=config.beta,
                    loss_type=config.loss,
                    labels=batch.get("labels"),
                    generator=generator,
                    anchor=dropped if config.uncond_anchor > 0 else None,
                    anchor_weight=config.uncond_anchor,
                )
                loss = figures["loss"]
                check_finite(loss, step + 1)
                for name, value in figures.items():
                    value = value.detach().float()
                    known = bool(torch.isfinite(value))
                    sums[name] = sums.get(name, 0.0) + (float(value) if known else 0.0)
                    counts[name] = counts.get(name, 0) + known
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            micro = 0
            if ema is not None:
                ema.step(trainable)
            step += 1
            bar.update(1)
            logs = mean_figures(accelerator, sums, counts)
            sums, counts = {}, {}
            logs["train/lr"] = scheduler.get_last_lr()[0]
            accuracy = logs.get("train/implicit_accuracy", float("nan"))
            bar.set_postfix(loss=f"{logs['train/loss']:.4f}", acc=f"{accuracy:.2f}")
            append_log(accelerator, out, step, logs)
            if step % config.logging_steps == 0 or step == config.max_steps:
                accelerator.log(logs, step=step)
            if held_out is not None and (
                step == config.max_steps
                or (config.validation_steps and step % config.validation_steps == 0)
            ):
                with averaged_weights(ema, trainable):  # validate what would be released
                    validation = validate(
                        unet,
                        reference,
                        noise_scheduler,
                        held_out,
                        parts,
                        config,
                        family,
                        accelerator.device,
                    )
                accelerator.log(validation, step=step)
                append_log(accelerator, out, step, validation)
                if accelerator.is_main_process:
                    bar.write(  # a line above the progress bar, not through it
                        f"step {step}: validation loss {validation['val/loss']:.4f}, implicit "
                        f"accuracy {validation['val/implicit_accuracy']:.3f}, winner drift "
                        f"{validation['val/winner_drift']:+.2e} on {validation['val/pairs']} pairs"
                    )
            if config.checkpointing_steps and step % config.checkpointing_steps == 0:
                writer = release(accelerator, unet, config, ema, trainable)
                save_checkpoint(accelerator, config, step, extra_files=writer, **batches.state())
            if step >= config.max_steps:
                break
    bar.close()
    bad_rows = batches.all_bad_rows()
    accelerator.wait_for_everyone()
    final = out / "final"
    metrics = {
        "steps": step,
        "train_minutes": round((time.time() - started) / 60, 2),
        "world_size": accelerator.num_processes,
        "skipped_batches": batches.skipped,
        "data": dataset.report.with_bad_rows(bad_rows).as_dict(),
        "distributed_type": accelerator.distributed_type.value,
        "final_loss": logs.get("train/loss"),
        "final_implicit_accuracy": logs.get("train/implicit_accuracy"),
    }
    if validation is not None:
        figures = {k.split("/")[1]: v for k, v in validation.items()}
        metrics["validation"] = {"split": config.validation_split, "step": step, **figures}
    writer = release(accelerator, unet, config, ema, trainable)
    if accelerator.is_main_process:
        publish(final, writer, metrics, card(config, family, metrics, accelerator.num_processes))
        accelerator.print(f"aligned {family.upper()} {config.mode}: {final}\n{metrics}")
    accelerator.end_training()
    return final
