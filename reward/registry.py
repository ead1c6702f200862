"""Rewards for the online methods, named in a config by one string:

- ``toy-oracle``: the toy world's ground truth (``pickalign.reward.toyworld.OracleReward``);
- ``pickscore`` or ``pickscore:<model>``: ``pickalign.reward.PickScore`` in this process (a Hub id or a
  folder the reward recipe wrote; default PickScore_v1), scoring decoded tensors directly;
- ``clip`` or ``clip:<model>``: CLIP score, 100 * max(cos, 0) (default CLIP ViT-L/14);
- ``aesthetic:<weights.pth>`` or ``aesthetic:<weights.pth>:<clip model>``: the LAION aesthetic
  predictor from its local weights file, on CLIP ViT-L/14 unless another CLIP is named;
- ``<module>:<function>``: any callable ``(prompts, images) -> scores``, from an installed module
  or one in the current directory.

Every reward answers ``score(prompts, images) -> (N,) float tensor``, images being PIL images
or (3, H, W) tensors in [0, 1].
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys

import torch


class CallableReward:
    """A plain function ``(prompts, images) -> scores`` behind the ``score`` interface."""

    def __init__(self, function, name: str):
        self.function, self.name = function, name

    def score(self, prompts, images) -> torch.Tensor:
        prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
        scores = torch.as_tensor(self.function(prompts, images), dtype=torch.float32).flatten()
        if len(scores) != len(images):
            raise ValueError(
                f"reward {self.name} gave {len(scores)} scores for {len(images)} images"
            )
        return scores


@contextlib.contextmanager
def _current_directory_importable():
    """The current directory on the import path for one import (a module beside the user's
    config, as ``python -m`` would find it), and off it again afterwards."""
    here = os.getcwd()
    added = here not in sys.path
    if added:
        sys.path.insert(0, here)
    try:
        yield
    finally:
        if added and here in sys.path:
            sys.path.remove(here)


def load_reward(spec: str, device=None):
    """The reward ``spec`` names (see the module docstring)."""
    if spec == "toy-oracle":
        from pickalign.reward.toyworld import OracleReward

        return OracleReward()
    if spec == "pickscore" or spec.startswith("pickscore:"):
        from pickalign.reward.pickscore import PICKSCORE_MODEL, PickScore

        model = spec.partition(":")[2] or PICKSCORE_MODEL
        return PickScore.from_pretrained(model, device=device)
    if spec == "clip" or spec.startswith("clip:"):
        from pickalign.reward.scorers import CLIP_SCORE_MODEL, ClipScore

        return ClipScore.from_pretrained(spec.partition(":")[2] or CLIP_SCORE_MODEL, device)
    if spec.startswith("aesthetic:"):
        from pickalign.reward.scorers import CLIP_SCORE_MODEL, AestheticScore

        weights, _, clip = spec.removeprefix("aesthetic:").partition(":")
        return AestheticScore.from_files(weights, clip or CLIP_SCORE_MODEL, device)
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise ValueError(
            f"reward {spec!r}: expected toy-oracle, pickscore[:MODEL], clip[:MODEL], "
            "aesthetic:WEIGHTS[:CLIP] or module:function"
        )
    try:
        with _current_directory_importable():
            function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"reward {spec!r}: cannot import it ({error})") from None
    if not callable(function):
        raise ValueError(f"reward {spec!r}: {function_name} is not callable")
    return CallableReward(function, spec)
