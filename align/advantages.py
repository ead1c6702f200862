"""Advantages for policy-gradient alignment from per-sample rewards.

Two normalisations, as the online methods use them:

- ``PromptStats``: DDPO's per-prompt tracker (Black et al. 2023). Each prompt keeps a buffer of
  its recent rewards; a sample's advantage is its reward standardised by its prompt's buffer, or
  by the whole batch while the prompt has fewer than ``min_count`` rewards. It is saved in
  checkpoints (``state_dict`` / ``load_state_dict``), so a resumed run normalises as before.
- ``group_advantages``: the group-relative form (GRPO; Flow-GRPO and DanceGRPO for diffusion):
  k samples of one prompt drawn in the same batch are standardised within their group.
"""

from __future__ import annotations

from collections import deque

import torch

EPS = 1e-6


def _standardise(values: torch.Tensor, reference: torch.Tensor, use_std: bool) -> torch.Tensor:
    centred = values - reference.mean()
    if not use_std:
        return centred
    return centred / (reference.std(unbiased=False) + EPS)


def group_advantages(rewards: torch.Tensor, groups: list, use_std: bool = True) -> torch.Tensor:
    """(N,) advantages: each reward minus its group's mean, over its group's standard deviation
    (population, plus 1e-6) when ``use_std``. ``groups[i]`` names sample i's group (say, its
    prompt); a group of one sample gets advantage 0."""
    rewards = rewards.float()
    if len(groups) != len(rewards):
        raise ValueError(f"{len(groups)} group labels for {len(rewards)} rewards")
    advantages = torch.zeros_like(rewards)
    for group in dict.fromkeys(groups):
        members = torch.tensor([g == group for g in groups])
        advantages[members] = _standardise(rewards[members], rewards[members], use_std)
    return advantages


class PromptStats:
    """DDPO's per-prompt reward normalisation with a buffer of the last ``buffer_size`` rewards
    of each prompt (see the module docstring)."""

    def __init__(self, buffer_size: int = 32, min_count: int = 16):
        if min_count > buffer_size:
            raise ValueError(f"min_count {min_count} is more than buffer_size {buffer_size}")
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers: dict[str, deque] = {}

    def advantages(self, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        """Add this batch's rewards to the buffers, then standardise each reward."""
        rewards = rewards.float().cpu()
        if len(prompts) != len(rewards):
            raise ValueError(f"{len(prompts)} prompts for {len(rewards)} rewards")
        advantages = torch.empty_like(rewards)
        for prompt in dict.fromkeys(prompts):
            members = torch.tensor([p == prompt for p in prompts])
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(rewards[members].tolist())
            reference = torch.tensor(list(buffer)) if len(buffer) >= self.min_count else rewards
            advantages[members] = _standardise(rewards[members], reference, use_std=True)
        return advantages

    def state_dict(self) -> dict:
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "buffers": {prompt: list(values) for prompt, values in self.buffers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.buffer_size, self.min_count = state["buffer_size"], state["min_count"]
        self.buffers = {
            prompt: deque(values, maxlen=self.buffer_size)
            for prompt, values in state["buffers"].items()
        }
