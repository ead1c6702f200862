"""Train a PickScore-style preference reward on Pick-a-Pic pairs.

    accelerate launch --config_file accelerate_configs/zero2.yaml recipes/train_reward.py \
        --config recipes/configs/reward/pickscore_clip_h.yaml
    accelerate launch recipes/train_reward.py --config recipes/configs/reward/toy.yaml

Supports DDP and DeepSpeed ZeRO-2, bf16, gradient checkpointing, AdamW or 8-bit AdamW, resume
with --resume_from_checkpoint latest. Writes <output_dir>/final (CLIPModel + CLIPProcessor,
metrics.json, README.md). See reward/train.py.
"""

import sys

from pickalign.config import parse_config
from pickalign.reward.train import RewardConfig, train
from pickalign.runtime import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(lambda argv: train(parse_config(RewardConfig, argv))))
