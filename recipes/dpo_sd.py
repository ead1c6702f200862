"""Diffusion-DPO for an SD 1.x/2.x UNet on Pick-a-Pic preference pairs, LoRA by default.

    accelerate launch --config_file accelerate_configs/zero2.yaml recipes/dpo_sd.py \
        --config recipes/configs/dpo/sd15_pickapic_v2_lora.yaml
    accelerate launch recipes/dpo_sd.py --config recipes/configs/dpo/toy_sd.yaml

Writes <output_dir>/final: pytorch_lora_weights.safetensors (load it with
pipe.load_lora_weights), or a diffusers UNet folder in full mode, plus README.md and
metrics.json (with the toy world's oracle win rate over the base when toy_eval_prompts
is set). Resume with --resume_from_checkpoint latest. See align/dpo.py for every option.
"""

import sys

from pickalign.align.dpo import DPOConfig, train
from pickalign.config import parse_config
from pickalign.eval.toy.judge import ToyJudgeConfig, judge_toy_run
from pickalign.runtime import run_cli


def main(argv: list[str]) -> None:
    config, judge = parse_config((DPOConfig, ToyJudgeConfig), argv)
    judge_toy_run(config.model, train(config, "sd"), judge)


if __name__ == "__main__":
    sys.exit(run_cli(main))
