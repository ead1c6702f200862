"""Diffusion-DPO for an SD 1.x/2.x or SDXL UNet on Pick-a-Pic preference pairs, LoRA by default.

    accelerate launch --config_file accelerate_configs/zero2.yaml recipes/dpo.py \
        --config recipes/configs/dpo/sdxl_pickapic_v2_lora.yaml
    accelerate launch recipes/dpo.py --config recipes/configs/dpo/toy_sdxl.yaml

The family (SD or SDXL) is read from the model's UNet. Writes <output_dir>/final:
pytorch_lora_weights.safetensors (load it with pipe.load_lora_weights), or a diffusers UNet
folder in full mode, plus README.md and metrics.json; toy runs with toy_eval_prompts write the
oracle's win rate over the base to <output_dir>/toy_eval.json. Resume with
--resume_from_checkpoint latest. See align/dpo.py and align/dpo_config.py for every option.
"""

import sys

from pickalign.align.dpo import DPOConfig, train
from pickalign.align.models import detect_family
from pickalign.eval.toy.judge import judge_toy_run, recipe_config
from pickalign.runtime import run_cli


def main(argv: list[str]) -> None:
    config, judge = recipe_config(DPOConfig, argv)
    judge_toy_run(config.model, train(config, detect_family(config.model)), judge)


if __name__ == "__main__":
    sys.exit(run_cli(main))
