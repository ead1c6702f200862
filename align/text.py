"""Prompt encoding for SD 1.x/2.x and SDXL, with frozen text encoders (always under no_grad:
a graph kept through a frozen encoder breaks the second backward pass)."""

from __future__ import annotations

import torch


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """(B, 77) token ids, padded and truncated to the tokenizer's length."""
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


@torch.no_grad()
def encode_sd(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """SD 1.x/2.x context: the encoder's last hidden state, (B, 77, D)."""
    ids = tokenize(tokenizer, prompts).to(text_encoder.device)
    return text_encoder(ids)[0]


@torch.no_grad()
def encode_sdxl(tokenizers, text_encoders, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL context and pooled embedding, as the SDXL pipeline builds them.

    Returns ``prompt_embeds`` (B, 77, D1 + D2): the penultimate hidden states of both encoders
    concatenated; and ``pooled`` (B, D2): the projected pooled output of the second encoder.
    """
    hidden, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        out = encoder(tokenize(tokenizer, prompts).to(encoder.device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # text_embeds of CLIPTextModelWithProjection (the last encoder)
    return torch.cat(hidden, dim=-1), pooled


def sdxl_time_ids(
    original_size: tuple[int, int],
    crop_top_left: tuple[int, int],
    target_size: tuple[int, int],
) -> torch.Tensor:
    """SDXL micro-conditioning, (6,): original (h, w), crop (top, left), target (h, w)."""
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)
