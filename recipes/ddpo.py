"""DDPO (and its group-relative form) for an SD 1.x/2.x or SDXL UNet, LoRA by default, with a
reward in the loop: PickScore, the toy world's oracle, or any (prompts, images) -> scores.

    accelerate launch --config_file accelerate_configs/zero2.yaml recipes/ddpo.py \
        --config recipes/configs/ddpo/sdxl_pickscore.yaml
    accelerate launch recipes/ddpo.py --config recipes/configs/ddpo/toy_sdxl.yaml

The family (SD or SDXL) is read from the model's UNet. Writes <output_dir>/final:
pytorch_lora_weights.safetensors (load it with pipe.load_lora_weights), README.md and
metrics.json, and monitor.png when monitor_prompts is set; toy runs with toy_eval_prompts
write the oracle's win rate over the base to <output_dir>/toy_eval.json. Resume with
--resume_from_checkpoint latest. See align/ddpo.py and align/online.py for every option.
"""

import sys

from pickalign.align.ddpo import DDPOConfig, train
from pickalign.align.models import detect_family
from pickalign.eval.toy.judge import judge_toy_run, recipe_config
from pickalign.runtime import run_cli


def main(argv: list[str]) -> None:
    config, judge = recipe_config(DDPOConfig, argv)
    judge_toy_run(config.model, train(config, detect_family(config.model)), judge)


if __name__ == "__main__":
    sys.exit(run_cli(main))
