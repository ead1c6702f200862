"""Two common image scorers beside PickScore, on the same CLIP machinery:

- ``ClipScore``: prompt-image agreement of a plain CLIP model, ``100 * max(cos(text, image), 0)``
  (Hessel et al. 2021, with w = 100 as most text-to-image papers report it);
- ``AestheticScore``: the LAION aesthetic predictor, a small head on the L2-normalised image
  embedding of CLIP ViT-L/14, from its local weights file. Both the linear v1 head
  (``weight``/``bias``) and the MLP v2 head (``layers.N.weight``, e.g.
  ``sac+logos+ava1-l14-linearMSE.pth``) load; the prompt is ignored.

Both answer ``score(prompts, images) -> (N,) float tensor`` like ``PickScore``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from pickalign.reward.pickscore import ImageLike, PickScore

CLIP_SCORE_MODEL = "openai/clip-vit-large-patch14"


class ClipScore:
    """CLIP score of images for their prompts (see the module docstring)."""

    def __init__(self, clip: PickScore):
        self.clip = clip

    @classmethod
    def from_pretrained(cls, model: str | Path = CLIP_SCORE_MODEL, device=None) -> ClipScore:
        return cls(PickScore.from_pretrained(model, device=device))

    def score(self, prompts: str | Sequence[str], images: Sequence[ImageLike]) -> torch.Tensor:
        cosine = self.clip.score(prompts, images) / self.clip.logit_scale().cpu()
        return (100 * cosine).clamp(min=0)


class AestheticMLP(torch.nn.Module):
    """The v2 head: ``layers`` as in its weights file (linear layers, dropout between them)."""

    def __init__(self, layers: list[torch.nn.Module]):
        super().__init__()
        self.layers = torch.nn.Sequential(*layers)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


def aesthetic_head(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The predictor's head for a state dict: ``Linear(D, 1)`` (v1) or the v2 MLP, whose linear
    layers sit at ``layers.0, 2, 4, 6, 7`` with dropout between them (inactive in eval)."""
    if set(state) == {"weight", "bias"}:
        head = torch.nn.Linear(state["weight"].shape[1], 1)
    else:
        indices = sorted({int(k.split(".")[1]) for k in state if k.startswith("layers.")})
        if not indices:
            raise ValueError(
                f"not an aesthetic predictor state dict (keys: {sorted(state)[:4]} ...): "
                "expected weight/bias or layers.N.weight"
            )
        modules: list[torch.nn.Module] = [torch.nn.Identity() for _ in range(indices[-1] + 1)]
        for i in indices:
            out_features, in_features = state[f"layers.{i}.weight"].shape
            modules[i] = torch.nn.Linear(in_features, out_features)
        head = AestheticMLP(modules)
    head.load_state_dict(state)
    return head.eval().requires_grad_(False)


class AestheticScore:
    """The LAION aesthetic predictor (see the module docstring); about 1-10, higher nicer."""

    def __init__(self, head: torch.nn.Module, clip: PickScore):
        dim = clip.model.config.projection_dim
        first = next(m for m in head.modules() if isinstance(m, torch.nn.Linear))
        if first.in_features != dim:
            raise ValueError(
                f"the aesthetic head takes {first.in_features}-d embeddings but the CLIP model "
                f"gives {dim}-d ones: it was made for another CLIP (ViT-L/14 gives 768)"
            )
        self.head, self.clip = head.to(clip.device), clip

    @classmethod
    def from_files(
        cls, weights: str | Path, clip: str | Path = CLIP_SCORE_MODEL, device=None
    ) -> AestheticScore:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(
                f"aesthetic weights {weights}: no such file (download the LAION predictor's "
                ".pth and give its path)"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        return cls(aesthetic_head(state), PickScore.from_pretrained(clip, device=device))

    @torch.inference_mode()
    def score(self, prompts, images: Sequence[ImageLike]) -> torch.Tensor:
        embeddings = self.clip.embed_images(images).float()  # (N, D), L2-normalised
        return self.head(embeddings).flatten().cpu()
