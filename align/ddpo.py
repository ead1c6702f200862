"""DDPO (Black et al. 2023, arXiv 2305.13301) for SD 1.x/2.x and SDXL UNets, with the
group-relative advantages of Flow-GRPO / DanceGRPO as an option.

Each round the policy samples images with stochastic DDIM (eta > 0), recording every step's
log-probability (``pickalign.align.sampler``); a reward scores them; rewards become advantages, normalised
per prompt (``PromptStats``: a buffer of each prompt's recent rewards, kept in checkpoints) or
within the ``group_size`` samples of a prompt drawn together (``group``). Then, for
``inner_epochs`` passes, each sample's steps (a random ``timestep_fraction`` of them, drawn
from the first ``timestep_window`` of the trajectory) are recomputed under the policy with guidance and trained with PPO's clipped objective
(``pickalign.align.losses.ppo_clip_loss``), plus an optional KL penalty to the reference, the LoRA-disabled
UNet, on the Gaussian means of the steps (Flow-GRPO's form). LoRA by default; the output is a
diffusers-format LoRA that ``pipe.load_lora_weights`` loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from pickalign.align.advantages import PromptStats, group_advantages
from pickalign.align.lora import adapters_disabled
from pickalign.align.losses import gaussian_kl, ppo_clip_loss
from pickalign.align.online import (
    OnlineConfig,
    end_round,
    finish_run,
    own_slice,
    reward_figures,
    rollout,
    round_prompts,
    score_and_gather,
    start_run,
)
from pickalign.align.sampler import recompute_step
from pickalign.config import ConfigError
from pickalign.runtime import check_finite, mean_figures, progress_bar


@dataclass
class DDPOConfig(OnlineConfig):
    advantages: str = field(
        default="prompt_stats",
        metadata={
            "choices": ("prompt_stats", "group"),
            "help": "'prompt_stats': standardise by each prompt's buffer of recent rewards "
            "(DDPO); 'group': within the group_size samples of a prompt drawn together "
            "(GRPO).",
        },
    )
    stat_buffer_size: int = field(
        default=32, metadata={"range": "> 0", "help": "prompt_stats: rewards kept per prompt."}
    )
    stat_min_count: int = field(
        default=16,
        metadata={
            "range": "> 0",
            "help": "prompt_stats: below this many rewards a prompt uses the batch's statistics.",
        },
    )
    clip_range: float = field(
        default=1e-4, metadata={"range": "> 0", "help": "PPO clip range of the ratio."}
    )
    advantage_clip: float = field(
        default=5.0, metadata={"range": "> 0", "help": "Advantages clipped to [-c, c]."}
    )
    timestep_fraction: float = field(
        default=1.0,
        metadata={
            "range": "(0, 1]",
            "help": "Share of each sample's steps trained on, drawn from timestep_window.",
        },
    )
    timestep_window: float = field(
        default=1.0,
        metadata={
            "range": "(0, 1]",
            "help": "Share of the trajectory, from its first (noisiest) step, whose steps may be "
            "trained on. 1: any step (DDPO). Early steps decide the layout and colours; the "
            "last steps, which carry most of the gradient's norm, only refine.",
        },
    )
    kl_coef: float = field(
        default=0.0,
        metadata={
            "range": ">= 0",
            "help": "KL penalty to the reference (the UNet without LoRA) on the steps' "
            "Gaussian means (0: off; LoRA mode only).",
        },
    )
    learning_rate: float = field(default=3e-4, metadata={"range": "> 0", "help": "Learning rate."})

    def __post_init__(self):
        super().__post_init__()
        if self.eta <= 0:
            raise ConfigError("eta: DDPO needs eta > 0 (an eta-0 step has no log-probability)")
        if self.advantages == "group" and self.group_size < 2:
            raise ConfigError("advantages 'group' needs group_size >= 2")
        if self.stat_min_count > self.stat_buffer_size:
            raise ConfigError(
                f"stat_min_count {self.stat_min_count} is more than stat_buffer_size "
                f"{self.stat_buffer_size}"
            )
        if self.kl_coef and self.mode != "lora":
            raise ConfigError("kl_coef needs mode lora (the reference is the UNet without LoRA)")
        if self.train_timesteps() > self.window_timesteps():
            raise ConfigError(
                f"timestep_fraction {self.timestep_fraction} trains more steps than "
                f"timestep_window {self.timestep_window} holds; lower it to at most the window"
            )

    def train_timesteps(self) -> int:
        """Steps of each sample trained on."""
        return max(1, round(self.timestep_fraction * self.sample_steps))

    def window_timesteps(self) -> int:
        """The first steps of each trajectory that may be trained on."""
        return max(1, round(self.timestep_window * self.sample_steps))


# ----------------------------------------------------------------------------------------------
# Advantages and the loss of one step


def advantages_for_round(config: DDPOConfig, stats: PromptStats, prompts, rewards) -> torch.Tensor:
    """Advantages of every process's samples (the gathered ``prompts`` and ``rewards``). A
    group is a block of ``group_size`` samples drawn together for one prompt, in the order
    ``round_prompts`` lays them out, so a prompt drawn twice in a round makes two groups."""
    if config.advantages == "group":
        return group_advantages(rewards, [i // config.group_size for i in range(len(rewards))])
    return stats.advantages(prompts, rewards)


def ppo_step(unet, parts, trajectory, steps, advantages, config: DDPOConfig, reference=None):
    """The clipped objective of ``steps`` (B,) (one step index per sample) of ``trajectory``,
    plus the KL penalty to ``reference`` when ``kl_coef`` is set. Returns the figures to log."""
    policy = recompute_step(unet, parts, trajectory, steps, config.guidance_scale, config.eta)
    rows = torch.arange(len(steps))
    old = trajectory.log_probs[rows, steps].to(policy.log_prob)
    terms = ppo_clip_loss(
        policy.log_prob,
        old,
        advantages.to(policy.log_prob),
        config.clip_range,
        config.advantage_clip,
    )
    figures = {
        "loss": terms.loss,
        "policy_loss": terms.loss.detach(),
        "approx_kl": terms.approx_kl,
        "clip_fraction": terms.clip_fraction,
        "ratio_mean": terms.ratio.mean(),
        "ratio_max": terms.ratio.max(),
        "ratio_min": terms.ratio.min(),
    }
    if reference is not None:
        with torch.no_grad():
            ref = reference(trajectory, steps)
        kl = gaussian_kl(policy.mean, ref.mean, policy.std)
        figures["kl"] = kl.mean().detach()
        figures["loss"] = terms.loss + config.kl_coef * kl.mean()
    return figures


def lora_free_steps(accelerator, unet, parts, config: DDPOConfig):
    """``reference(trajectory, steps)``: the same steps under the UNet with its LoRA off."""

    def reference(trajectory, steps):
        inner = accelerator.unwrap_model(unet)
        with adapters_disabled(inner), accelerator.autocast():
            return recompute_step(
                inner, parts, trajectory, steps, config.guidance_scale, config.eta
            )

    return reference


def card_lines(config: DDPOConfig) -> list[str]:
    return [
        f"reward: {config.reward}; prompts: {config.prompts}",
        f"{config.samples_per_round} samples per process per round, groups of "
        f"{config.group_size}, {config.sample_steps} DDIM steps, eta {config.eta}, guidance "
        f"{config.guidance_scale}",
        f"advantages: {config.advantages}; clip range {config.clip_range}; "
        f"{config.inner_epochs} inner epochs on {config.timestep_fraction:.0%} of the steps, "
        f"from the first {config.timestep_window:.0%}; "
        f"KL coefficient {config.kl_coef}",
    ]


# ----------------------------------------------------------------------------------------------
# Training


def train(config: DDPOConfig, family: str) -> Path:
    """Run ``max_steps`` rounds; write ``<output_dir>/final`` (LoRA or UNet, card, metrics)."""
    train_steps = config.train_timesteps()
    # A micro-batch backpropagates once per trained step; the optimizer steps after all of
    # them, for gradient_accumulation_steps micro-batches.
    run = start_run(config, family, "DDPO", config.gradient_accumulation_steps * train_steps)
    accelerator, unet, parts = run.accelerator, run.unet, run.parts
    reference = lora_free_steps(accelerator, unet, parts, config) if config.kl_coef else None
    stats = PromptStats(config.stat_buffer_size, config.stat_min_count)
    if "prompt_stats" in run.state:
        stats.load_state_dict(run.state["prompt_stats"])
    round_, rank, logs = run.state["step"], accelerator.process_index, {}
    bar = progress_bar(accelerator, config.max_steps, round_, desc=f"ddpo {family}")
    while round_ < config.max_steps:
        # Sample and score; advantages from every process's rewards.
        prompts, seeds = round_prompts(run.prompts, config, round_, rank)
        trajectory = rollout(parts, run.policy, prompts, seeds, config, accelerator)
        _, all_prompts, all_rewards = score_and_gather(
            accelerator, run.reward, prompts, trajectory.images
        )
        advantages = advantages_for_round(config, stats, all_prompts, all_rewards)
        advantages = own_slice(advantages, accelerator)
        # Train: inner epochs over the samples, each sample on its own random steps.
        sums, count = {}, 0
        for epoch in range(config.inner_epochs):
            generator = torch.Generator().manual_seed(
                hash((config.seed, round_, epoch, rank)) % 2**63
            )
            order = torch.randperm(len(prompts), generator=generator)
            window = config.window_timesteps()
            step_order = torch.stack([torch.randperm(window, generator=generator) for _ in order])[
                :, :train_steps
            ]
            for start in range(0, len(order), config.train_batch_size):
                rows = order[start : start + config.train_batch_size]
                micro = trajectory.select(rows)
                for j in range(train_steps):
                    with accelerator.accumulate(unet):
                        figures = ppo_step(
                            unet,
                            parts,
                            micro,
                            step_order[rows, j],
                            advantages[rows],
                            config,
                            reference,
                        )
                        check_finite(figures["loss"], round_ + 1)
                        accelerator.backward(figures["loss"])
                        if accelerator.sync_gradients:
                            accelerator.clip_grad_norm_(run.trainable, config.max_grad_norm)
                        run.optimizer.step()
                        run.scheduler.step()
                        run.optimizer.zero_grad()
                    for key, value in figures.items():
                        sums[key] = sums.get(key, 0.0) + float(value.detach())
                    count += 1
        round_ += 1
        logs = {
            **mean_figures(accelerator, sums, count),
            **reward_figures(run, all_prompts, all_rewards),
            "train/lr": run.scheduler.get_last_lr()[0],
            "train/prompts_tracked": len(stats.buffers),
        }
        bar.update(1)
        bar.set_postfix(
            reward=f"{logs['train/reward_mean']:.3f}", kl=f"{logs['train/approx_kl']:.1e}"
        )
        end_round(run, round_, logs, prompt_stats=stats.state_dict())
    bar.close()
    tracked = {"prompts": len(stats.buffers), "rewards": sum(map(len, stats.buffers.values()))}
    return finish_run(run, round_, logs, card_lines(config), prompt_stats=tracked)
