"""Pretrain the toy CLIP: the toy world's image-text model, before any preference is seen.

    accelerate launch recipes/pretrain_toy_clip.py --config recipes/configs/toy/clip.yaml

CLIP's symmetric InfoNCE on renders, VAE reconstructions and latent morphs of all 450 toy
captions; resumes with --resume_from_checkpoint latest. Writes <output_dir>/final (CLIPModel +
CLIPProcessor, metrics.json with the zero-shot figures, README.md), the starting point of the toy
PickScore (recipes/configs/reward/toy.yaml). See eval/toy/clip.py.
"""

import sys

from pickalign.config import parse_config
from pickalign.eval.toy.clip import ToyClipConfig, train
from pickalign.runtime import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(lambda argv: train(parse_config(ToyClipConfig, argv))))
