"""The Pick-a-Pic preference objective, as pure functions of tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def preference_loss(
    scores_0: torch.Tensor,
    scores_1: torch.Tensor,
    label_0: torch.Tensor,
    label_1: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """PickScore's pairwise loss (Kirstain et al. 2023, eq. 1).

    With s_i the reward of image i for the prompt and p = softmax(s_0, s_1):

        L = sum_i y_i * (log y_i - log p_i),        y = (label_0, label_1)

    the KL divergence from the label distribution, which equals the paper's cross-entropy
    -sum_i y_i log p_i minus the labels' own entropy. For a winner/loser pair it is exactly the
    cross-entropy; for a tie (0.5, 0.5) the entropy term makes the best possible loss 0 (reached
    at s_0 = s_1) instead of log 2. ``weights`` (B,) weigh examples (the official trainer uses
    1 / num_example_per_prompt); the result is the weighted mean over the batch.
    """
    logits = torch.stack([scores_0, scores_1], dim=-1).float()  # (B, 2)
    labels = torch.stack([label_0, label_1], dim=-1).float()  # (B, 2)
    per_example = (torch.xlogy(labels, labels) - labels * F.log_softmax(logits, dim=-1)).sum(-1)
    if weights is None:
        return per_example.mean()
    weights = weights.float()
    return (per_example * weights).sum() / weights.sum()


def in_batch_negatives_loss(
    text: torch.Tensor,
    image_0: torch.Tensor,
    image_1: torch.Tensor,
    label_0: torch.Tensor,
    label_1: torch.Tensor,
    logit_scale: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The section 7 variant: each prompt's candidates are both of its images *and* every other
    prompt's images in the batch, which count as negatives (label 0).

    ``text``, ``image_0``, ``image_1`` are L2-normalised embeddings (B, D). With candidate logits
    l_b = logit_scale * [text_b . image_0_all, text_b . image_1_all] (B, 2B) and targets that put
    label_0 / label_1 on the prompt's own two images, the loss is the same KL as above.
    """
    batch = text.shape[0]
    candidates = torch.cat([image_0, image_1], dim=0)  # (2B, D)
    logits = logit_scale * text @ candidates.T  # (B, 2B)
    targets = torch.zeros_like(logits)
    own = torch.arange(batch, device=text.device)
    targets[own, own] = label_0.float()
    targets[own, own + batch] = label_1.float()
    per_example = (torch.xlogy(targets, targets) - targets * F.log_softmax(logits, -1)).sum(-1)
    if weights is None:
        return per_example.mean()
    return (per_example * weights.float()).sum() / weights.float().sum()
