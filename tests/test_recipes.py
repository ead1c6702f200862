"""One subprocess smoke run per recipe, the way users launch them (train_reward's runs are the
2-process tests in test_reward_train.py)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.integration
def test_pretrain_toy_recipe_builds_a_loadable_pipeline_and_resumes(tmp_path):
    args = [
        sys.executable,
        str(REPO / "recipes" / "pretrain_toy.py"),
        "--config",
        str(REPO / "recipes/configs/toy/sdxl.yaml"),
        "--output_dir",
        str(tmp_path),
        "--vae_steps",
        "2",
        "--vae_pool",
        "32",
        "--max_steps",
        "4",
        "--renders_per_prompt",
        "1",
        "--batch_size",
        "8",
        "--checkpointing_steps",
        "2",
        "--eval_prompts",
        "2",
        "--eval_sampling_steps",
        "2",
        "--report_to",
        "none",
    ]
    subprocess.run(args, check=True, cwd=REPO, capture_output=True)
    from diffusers import StableDiffusionXLPipeline

    StableDiffusionXLPipeline.from_pretrained(tmp_path / "pipeline")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["n"] == 2 and 0 <= metrics["all_correct"] <= 1
    assert (tmp_path / "config.yaml").exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "checkpoint-2",
        "checkpoint-4",
    ]
    # a longer run picks up from the last checkpoint instead of starting over
    resumed = subprocess.run(
        [*args, "--max_steps", "6", "--resume_from_checkpoint", "latest"],
        check=True,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert (
        "resumed from" in resumed.stdout + resumed.stderr
        and "at step 4" in resumed.stdout + resumed.stderr
    )
