"""Pretrain a toy-world base generator (SD-style or SDXL-style tiny pipeline) from scratch.

    accelerate launch recipes/pretrain_toy.py --config recipes/configs/toy/sd.yaml
    accelerate launch recipes/pretrain_toy.py --config recipes/configs/toy/sdxl.yaml

Stage 1 trains the VAE (skip it with --vae_from DIR), stage 2 the UNet on cached latents; both
resume with --resume_from_checkpoint latest. Writes <output_dir>/pipeline (loads with
DiffusionPipeline.from_pretrained) and <output_dir>/metrics.json (oracle adherence on the
held-out prompts). See eval/toy/pretrain.py.
"""

import sys

from pickalign.config import parse_config
from pickalign.eval.toy.pretrain import PretrainToyConfig, train
from pickalign.runtime import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(lambda argv: train(parse_config(PretrainToyConfig, argv))))
