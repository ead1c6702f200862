"""Prompt encoding for SD 1.x/2.x and SDXL.

``encode_sd`` / ``encode_sdxl`` run frozen text encoders under no_grad (a graph kept through a
frozen encoder breaks the second backward pass). ``sd_context`` / ``sdxl_context`` are the same
computation on token ids with gradients, for recipes that train a text encoder.
"""

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


def sd_context(text_encoder, ids: torch.Tensor) -> torch.Tensor:
    """SD 1.x/2.x context: the encoder's last hidden state, (B, 77, D)."""
    return text_encoder(ids.to(text_encoder.device))[0]


def sdxl_context(text_encoders, ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL context and pooled embedding, as the SDXL pipeline builds them.

    Returns ``prompt_embeds`` (B, 77, D1 + D2): the penultimate hidden states of both encoders
    concatenated; and ``pooled`` (B, D2): the projected pooled output of the second encoder.
    """
    hidden, pooled = [], None
    for encoder, encoder_ids in zip(text_encoders, ids):
        out = encoder(encoder_ids.to(encoder.device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # text_embeds of CLIPTextModelWithProjection (the last encoder)
    return torch.cat(hidden, dim=-1), pooled


@torch.no_grad()
def encode_sd(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    return sd_context(text_encoder, tokenize(tokenizer, prompts))


@torch.no_grad()
def encode_sdxl(tokenizers, text_encoders, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    return sdxl_context(text_encoders, [tokenize(t, prompts) for t in tokenizers])


def sdxl_time_ids(
    original_size: tuple[int, int],
    crop_top_left: tuple[int, int],
    target_size: tuple[int, int],
) -> torch.Tensor:
    """SDXL micro-conditioning, (6,): original (h, w), crop (top, left), target (h, w)."""
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)
