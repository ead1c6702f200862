"""Reward-weighted fine-tuning and best-of-n distillation (RAFT) for an SD 1.x/2.x or SDXL UNet,
LoRA by default: sample n images per prompt, score them with the reward, train on them weighted
(weighting: softmax or best_of_n).

    accelerate launch --config_file accelerate_configs/zero2.yaml recipes/reward_weighted.py \
        --config recipes/configs/reward_weighted/sdxl_pickscore.yaml
    accelerate launch recipes/reward_weighted.py \
        --config recipes/configs/reward_weighted/toy_sdxl_best_of_n.yaml

The family (SD or SDXL) is read from the model's UNet. Writes <output_dir>/final:
pytorch_lora_weights.safetensors (load it with pipe.load_lora_weights), README.md and
metrics.json, and monitor.png when monitor_prompts is set; toy runs with toy_eval_prompts
write the oracle's win rate over the base to <output_dir>/toy_eval.json. Resume with
--resume_from_checkpoint latest. See align/reward_weighted.py and align/online.py for every option.
"""

import sys

from pickalign.align.models import detect_family
from pickalign.align.reward_weighted import RewardWeightedConfig, train
from pickalign.eval.toy.judge import judge_toy_run, recipe_config
from pickalign.runtime import run_cli


def main(argv: list[str]) -> None:
    config, judge = recipe_config(RewardWeightedConfig, argv)
    judge_toy_run(config.model, train(config, detect_family(config.model)), judge)


if __name__ == "__main__":
    sys.exit(run_cli(main))
