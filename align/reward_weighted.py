"""Reward-weighted fine-tuning (Lee et al. 2023, arXiv 2302.12192) and best-of-n distillation
(RAFT, Dong et al. 2023, arXiv 2304.06767): one loop, two weightings.

Each round the policy samples ``group_size`` (n) images of each prompt, without guidance by
default (what the conditional UNet that trains would sample); the reward scores them;
each sample gets a weight from its reward relative to the other samples of its prompt
(``sample_weights``), and the UNet trains on its own samples with the plain denoising loss,
weighted:

- ``softmax``: w_i = n * softmax(r / temperature)_i within the group (mean weight 1): every
  sample counts, the better ones more; a high temperature tends to plain fine-tuning on the
  samples, a low one to best-of-1.
- ``best_of_n``: weight 1 on the top ``top_k`` samples of each group, 0 on the rest (RAFT's
  selection); the rest are not trained on.

Rounds repeat (online: each round samples from the current policy), or ``max_steps: 1`` with
several ``inner_epochs`` distils one big sample once (offline). ``regularizer_dataset`` mixes
in the denoising loss on reference images (Lee et al.'s pre-training term), weighted by
``regularizer_weight``: a Pick-a-Pic dataset's preferred images, or renders of the toy world's
prompts. Trained on its own samples alone, a model can drift even with equal weights (toy-sd
does: docs/experiments/2026-12-toy-online.md). LoRA by default; the output loads with
``pipe.load_lora_weights``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pickalign.align.losses import per_sample_mse, prediction_target
from pickalign.align.models import unet_forward
from pickalign.align.online import (
    OnlineConfig,
    end_round,
    finish_run,
    reward_figures,
    rollout,
    round_prompts,
    score_and_gather,
    start_run,
)
from pickalign.config import ConfigError
from pickalign.reward.sources import require
from pickalign.runtime import check_finite, mean_figures, progress_bar


@dataclass
class RewardWeightedConfig(OnlineConfig):
    weighting: str = field(
        default="softmax",
        metadata={
            "choices": ("softmax", "best_of_n"),
            "help": "'softmax': weights n * softmax(reward / temperature) within each prompt's "
            "samples (reward-weighted); 'best_of_n': train on the top_k of each prompt's n "
            "samples (RAFT).",
        },
    )
    temperature: float = field(
        default=1.0, metadata={"range": "> 0", "help": "softmax: the reward's temperature."}
    )
    top_k: int = field(
        default=1, metadata={"range": "> 0", "help": "best_of_n: samples kept per prompt."}
    )
    guidance_scale: float = field(
        default=1.0,
        metadata={
            "range": ">= 1",
            "help": "Guidance of the samples trained on. 1 (none) samples the model's own "
            "conditional distribution, which reward weighting assumes: training the conditional "
            "UNet on guided samples distils the guidance into it, and guided sampling then "
            "over-guides.",
        },
    )
    group_size: int = field(
        default=4,
        metadata={
            "range": "> 1",
            "help": "Samples per prompt per round (n), a group as in DDPO; weights compare "
            "within it.",
        },
    )
    regularizer_dataset: str | None = field(
        default=None,
        metadata={
            "help": "Reference images that add the plain denoising loss, against drift from "
            "training on the model's own samples: a Pick-a-Pic dataset (Hub id or folder, "
            "with :SPLIT), the preferred images of its first regularizer_rows rows, or "
            "toy[:SPLIT], renders of the toy world's prompts (the toy bases' pre-training "
            "data). None: off."
        },
    )
    regularizer_rows: int = field(
        default=4096,
        metadata={
            "range": "> 0",
            "help": "Rows of a Pick-a-Pic regularizer read, the split's first, streamed once "
            "into the datasets cache: a Hub image set is never downloaded whole.",
        },
    )
    regularizer_weight: float = field(
        default=1.0, metadata={"range": ">= 0", "help": "Weight of the regularizer's loss."}
    )
    learning_rate: float = field(default=1e-4, metadata={"range": "> 0", "help": "Learning rate."})

    def __post_init__(self):
        super().__post_init__()
        if self.weighting == "best_of_n" and self.top_k >= self.group_size:
            raise ConfigError(
                f"top_k {self.top_k} keeps every one of group_size {self.group_size} samples"
            )
        if self.regularizer_dataset:
            toy_split(self.regularizer_dataset)

    def trained_per_round(self) -> int:
        """Samples a round trains on (per process)."""
        if self.weighting == "best_of_n":
            return self.samples_per_round // self.group_size * self.top_k
        return self.samples_per_round


# ----------------------------------------------------------------------------------------------
# Weights and the loss of a micro-batch


def sample_weights(
    rewards: torch.Tensor,
    group_size: int,
    weighting: str,
    temperature: float = 1.0,
    top_k: int = 1,
) -> torch.Tensor:
    """(N,) training weights of samples drawn in groups of ``group_size`` consecutive samples of
    one prompt (see the module docstring): ``softmax`` gives n * softmax(r / temperature) per
    group (mean 1); ``best_of_n`` gives 1 to the ``top_k`` highest rewards of each group (the
    earlier sample on a tie) and 0 to the rest."""
    groups = rewards.float().view(-1, group_size)  # (N / n, n)
    if weighting == "softmax":
        weights = group_size * torch.softmax(groups / temperature, dim=1)
    elif weighting == "best_of_n":
        order = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, :top_k]
        weights = torch.zeros_like(groups).scatter_(1, order, 1.0)
    else:
        raise ValueError(f"weighting must be softmax or best_of_n, got {weighting!r}")
    return weights.flatten()


def weighted_denoising_loss(unet, scheduler, latents, cond, time_ids, weights, generator):
    """mean(w_i * ||target - prediction||^2) at a uniform timestep and fresh noise per sample:
    the denoising loss of ``latents`` (B, C, h, w), each weighted by ``weights`` (B,)."""
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    steps = scheduler.config.num_train_timesteps
    t = torch.randint(0, steps, (len(latents),), generator=generator).to(latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    prediction = unet_forward(unet, noisy, t, cond, time_ids)
    mse = per_sample_mse(prediction, prediction_target(scheduler, latents, noise, t))
    return (weights.to(mse) * mse).mean(), mse.detach()


def toy_split(spec: str) -> str | None:
    """The toy split ``spec`` (``toy[:SPLIT]``) names, None if it names no toy split; an
    unknown toy split is a ConfigError."""
    source, _, split = spec.partition(":")
    if source != "toy":
        return None
    from pickalign.reward.toyworld import prompt_splits

    if (split or "train") not in prompt_splits():
        raise ConfigError(
            f"regularizer_dataset {spec!r}: toy splits are {', '.join(prompt_splits())}"
        )
    return split or "train"


class Regularizer:
    """Denoising batches of reference images, in a seeded order: the preferred image of each pair
    in the first ``rows`` rows of a Pick-a-Pic split, or with ``toy[:SPLIT]`` fresh renders of
    the toy world's prompts (the toy bases' pre-training data)."""

    def __init__(self, spec: str, parts, resolution: int, seed: int, rows: int = 4096):
        self.parts, self.resolution, self.seed = parts, resolution, seed
        self.pairs = self.attributes = None
        split = toy_split(spec)
        if split:
            from pickalign.reward.toyworld import prompt_splits

            self.attributes = prompt_splits()[split]
            return
        from pickalign.align.pairs import PreferencePairs
        from pickalign.reward.data import first_rows

        source, _, split = spec.partition(":")
        self.pairs = PreferencePairs(
            first_rows(source, split or "train", rows), resolution, skip_bad=True, seed=seed
        )
        if len(self.pairs) == 0:
            raise ValueError(f"regularizer_dataset {spec!r}: no usable pair")

    def images(self, size: int, round_: int, micro: int, rank: int):
        """(pixels (size, 3, R, R) in [-1, 1], prompts, time ids (size, 6)) of one batch."""
        from pickalign.align.pairs import choose_crop, collate_pairs, prepare_image

        rng = torch.Generator().manual_seed(hash((self.seed, round_, micro, rank)) % 2**63)
        if self.attributes is not None:
            from pickalign.reward.toyworld import render

            rows = torch.randint(0, len(self.attributes), (size,), generator=rng).tolist()
            shown = [self.attributes[i] for i in rows]
            draw = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=rng)))
            centred = choose_crop(draw, random_crop=False, random_flip=False)
            prepared = [
                prepare_image(render(a, draw, self.resolution), self.resolution, centred)
                for a in shown
            ]
            pixels, time_ids = (torch.stack(t) for t in zip(*prepared))
            return pixels, [a.prompt for a in shown], time_ids
        rows = torch.randint(0, len(self.pairs), (size,), generator=rng).tolist()
        batch = collate_pairs([self.pairs[i] for i in rows])
        if "prompt" not in batch:
            raise ValueError("regularizer_dataset: a whole batch of bad rows")
        # the preferred image of each pair (winner first)
        return batch["pixels"][:, 0], batch["prompt"], batch["time_ids"][:, 0]

    def batch(self, size: int, round_: int, micro: int, rank: int, device):
        """(latents, conditioning, time ids) of ``size`` reference images."""
        pixels, prompts, time_ids = self.images(size, round_, micro, rank)
        latents = self.parts.encode_images(pixels.to(device)).float()
        return latents, self.parts.encode_prompts(prompts), time_ids.to(device)


def card_lines(config: RewardWeightedConfig) -> list[str]:
    weighting = (
        f"softmax, temperature {config.temperature}"
        if config.weighting == "softmax"
        else f"best of {config.group_size}, top {config.top_k}"
    )
    lines = [
        f"reward: {config.reward}; prompts: {config.prompts}",
        f"weighting: {weighting}; {config.samples_per_round} samples per process per round, "
        f"{config.sample_steps} DDIM steps, eta {config.eta}, guidance {config.guidance_scale}",
        f"{config.inner_epochs} passes over each round's samples",
    ]
    if config.regularizer_dataset:
        lines.append(
            f"regularizer: {config.regularizer_dataset}, weight {config.regularizer_weight}"
        )
    return lines


# ----------------------------------------------------------------------------------------------
# Training


def train(config: RewardWeightedConfig, family: str) -> Path:
    """Run ``max_steps`` rounds; write ``<output_dir>/final`` (LoRA or UNet, card, metrics)."""
    method = "reward-weighted" if config.weighting == "softmax" else "best-of-n distillation"
    if config.regularizer_dataset and not toy_split(config.regularizer_dataset):
        require(config.regularizer_dataset.partition(":")[0], "dataset", "regularizer_dataset")
    run = start_run(config, family, method)
    accelerator, unet, parts = run.accelerator, run.unet, run.parts
    noise_scheduler = parts.noise_scheduler
    regularizer = None
    if config.regularizer_dataset:
        size = config.resolution or run.policy.config.sample_size * parts.vae_scale
        regularizer = Regularizer(
            config.regularizer_dataset, parts, size, config.seed, config.regularizer_rows
        )
    round_, rank, logs = run.state["step"], accelerator.process_index, {}
    bar = progress_bar(accelerator, config.max_steps, round_, desc=f"{method} {family}")
    while round_ < config.max_steps:
        # Sample n per prompt, score, weigh within each prompt's samples.
        prompts, seeds = round_prompts(run.prompts, config, round_, rank)
        # Only x_0 is trained on: no trajectory or log-probabilities are kept.
        trajectory = rollout(
            parts, run.policy, prompts, seeds, config, accelerator, keep_trajectory=False
        )
        rewards, all_prompts, all_rewards = score_and_gather(
            accelerator, run.reward, prompts, trajectory.images
        )
        weights = sample_weights(
            rewards, config.group_size, config.weighting, config.temperature, config.top_k
        )
        kept = torch.nonzero(weights > 0).flatten()  # best_of_n trains on the selected only
        samples = trajectory.select(kept)
        latents, weights = samples.latents[:, -1], weights[kept]  # the sampled x_0
        # Train: passes over the kept samples, weighted denoising loss.
        sums, count, micro = {}, 0, 0
        for epoch in range(config.inner_epochs):
            generator = torch.Generator().manual_seed(
                hash((config.seed, round_, epoch, rank)) % 2**63
            )
            order = torch.randperm(len(kept), generator=generator)
            for start in range(0, len(order), config.train_batch_size):
                rows = order[start : start + config.train_batch_size]
                ids = None if samples.time_ids is None else samples.time_ids[rows]
                with accelerator.accumulate(unet):
                    loss, mse = weighted_denoising_loss(
                        unet,
                        noise_scheduler,
                        latents[rows],
                        samples.cond.index(rows),
                        ids,
                        weights[rows],
                        generator,
                    )
                    figures = {"weighted_loss": loss.detach(), "mse": mse.mean()}
                    if regularizer is not None:
                        batch = regularizer.batch(
                            len(rows), round_, micro, rank, accelerator.device
                        )
                        regular, _ = weighted_denoising_loss(
                            unet, noise_scheduler, *batch, torch.ones(len(rows)), generator
                        )
                        figures["regularizer_loss"] = regular.detach()
                        loss = loss + config.regularizer_weight * regular
                    figures["loss"] = loss.detach()
                    check_finite(loss, round_ + 1)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(run.trainable, config.max_grad_norm)
                    run.optimizer.step()
                    run.scheduler.step()
                    run.optimizer.zero_grad()
                for key, value in figures.items():
                    sums[key] = sums.get(key, 0.0) + float(value.detach())
                count, micro = count + 1, micro + 1
        round_ += 1
        trained = torch.stack([(weights * rewards[kept].float()).sum(), weights.sum()])
        trained = accelerator.reduce(trained.to(accelerator.device), "sum").cpu()
        logs = {
            **mean_figures(accelerator, sums, count),
            **reward_figures(run, all_prompts, all_rewards),
            "train/trained_reward_mean": float(trained[0] / trained[1]),  # every process's
            "train/lr": run.scheduler.get_last_lr()[0],
        }
        bar.update(1)
        bar.set_postfix(reward=f"{logs['train/reward_mean']:.3f}", loss=f"{logs['train/loss']:.4f}")
        end_round(run, round_, logs)
    bar.close()
    return finish_run(run, round_, logs, card_lines(config))
