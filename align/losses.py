"""Pure loss functions for diffusion alignment. No models, no state: tensors in, tensors out."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def prediction_target(scheduler, latents, noise, timesteps) -> torch.Tensor:
    """What the UNet is trained to predict: the noise (epsilon) or the velocity (v)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction_type {kind!r} is not supported (epsilon or v_prediction)")


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error averaged over every dimension but the batch: (B, C, H, W) -> (B,), fp32."""
    error = (prediction.float() - target.float()) ** 2
    return error.mean(dim=tuple(range(1, error.ndim)))


@dataclass
class DPOTerms:
    loss: torch.Tensor  # scalar
    implicit_accuracy: torch.Tensor  # share of pairs the policy already ranks right, scalar
    model_diff: torch.Tensor  # (B,) mse_θ(w) - mse_θ(l)
    reference_diff: torch.Tensor  # (B,) mse_ref(w) - mse_ref(l)
    winner_drift: torch.Tensor  # (B,) mse_θ(w) - mse_ref(w): > 0 when the winner got less likely


def diffusion_dpo_loss(
    model_mse_w: torch.Tensor,
    model_mse_l: torch.Tensor,
    reference_mse_w: torch.Tensor,
    reference_mse_l: torch.Tensor,
    beta: float = 5000.0,
    labels: torch.Tensor | None = None,
) -> DPOTerms:
    """Diffusion-DPO (Wallace et al. 2023, eq. 14 with the per-timestep constant folded into beta):

        loss = -log sigmoid(-beta / 2 * [(mse_θ(w) - mse_ref(w)) - (mse_θ(l) - mse_ref(l))])

    from per-sample MSEs of winner and loser under the same noise and timestep. At policy ==
    reference the loss is log 2 and the implicit accuracy 0.5 (ties count half).

    With ``labels`` (the first image's label: 1, 0 or 0.5 for a tie) the loss is the
    cross-entropy of the margin against them.
    """
    model_diff = model_mse_w - model_mse_l
    reference_diff = (reference_mse_w - reference_mse_l).detach()
    winner_drift = model_mse_w - reference_mse_w.detach()
    margin = -0.5 * beta * (model_diff - reference_diff)
    accuracy = (margin > 0).float().mean() + 0.5 * (margin == 0).float().mean()
    if labels is None:
        loss = -F.logsigmoid(margin).mean()
    else:
        labels = labels.to(margin)
        loss = -(labels * F.logsigmoid(margin) + (1 - labels) * F.logsigmoid(-margin)).mean()
    return DPOTerms(
        loss, accuracy.detach(), model_diff.detach(), reference_diff, winner_drift.detach()
    )


@dataclass
class PPOTerms:
    loss: torch.Tensor  # scalar
    approx_kl: torch.Tensor  # scalar, 0.5 * mean((log ratio)^2)
    clip_fraction: torch.Tensor  # scalar, share of samples whose ratio left [1 - c, 1 + c]
    ratio: torch.Tensor  # (B,) detached


def ppo_clip_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float = 1e-4,
    advantage_clip: float | None = 5.0,
) -> PPOTerms:
    """DDPO's per-timestep objective (Black et al. 2023, the PPO clipped surrogate): with
    ratio r = exp(log_prob - old_log_prob),

        loss = mean(max(-A * r, -A * clip(r, 1 - c, 1 + c)))

    ``advantages`` A are clipped to [-advantage_clip, advantage_clip] first (None: not clipped).
    DDPO's clip range is tiny (1e-4) because the log-probabilities are means over every latent
    dimension. ``approx_kl`` is the estimate 0.5 * mean((log r)^2) that DDPO logs.
    """
    if advantage_clip is not None:
        advantages = advantages.clamp(-advantage_clip, advantage_clip)
    log_ratio = log_prob - old_log_prob.detach()
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    approx_kl = 0.5 * (log_ratio.detach() ** 2).mean()
    clip_fraction = ((ratio.detach() - 1.0).abs() > clip_range).float().mean()
    return PPOTerms(loss, approx_kl, clip_fraction, ratio.detach())


def gaussian_kl(
    mean: torch.Tensor, reference_mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """KL divergence between two Gaussian steps of equal spread, per sample: the policy's
    N(mean, std^2 I) from the reference's N(reference_mean, std^2 I), averaged over the latent
    dimensions as the steps' log-probabilities are (Flow-GRPO's KL term):

        kl = mean_d (mean - reference_mean)^2 / (2 std^2)

    ``mean`` and ``reference_mean`` (B, C, h, w), ``std`` (B,) -> (B,). The reference carries no
    gradient."""
    dims = tuple(range(1, mean.ndim))
    squared = ((mean.float() - reference_mean.detach().float()) ** 2).mean(dim=dims)
    return squared / (2 * std.float() ** 2)
