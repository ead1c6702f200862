"""The reward recipe on the toy world: tiny CLIP from scratch, a few steps."""

import json

import pytest
import yaml

from pickalign.reward.train import RewardConfig, train
from tests.conftest import REPO, launch


def small(toy_pairs, out, **overrides) -> RewardConfig:
    fields = dict(
        from_scratch=True,
        dataset=str(toy_pairs),
        output_dir=str(out),
        batch_size=4,
        max_steps=6,
        warmup_steps=2,
        learning_rate=1e-3,
        eval_steps=0,
        checkpointing_steps=3,
        report_to="none",
    )
    return RewardConfig(**{**fields, **overrides})


def losses(folder) -> dict[int, float]:
    lines = (folder / "log.jsonl").read_text().splitlines()
    return {row["step"]: row["train/loss"] for row in map(json.loads, lines)}


def test_output_loads_with_the_model_card_code_and_has_metrics(toy_pairs, tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    final = train(small(toy_pairs, tmp_path, eval_steps=3))
    CLIPModel.from_pretrained(final), CLIPProcessor.from_pretrained(final)
    metrics = json.loads((final / "metrics.json").read_text())
    assert {
        "accuracy",
        "accuracy_ci95",
        "accuracy_no_ties",
        "tie_threshold",
        "train_minutes",
    } <= set(metrics)
    assert metrics["world_size"] == 1 and metrics["steps"] == 6
    assert "accuracy" in (final / "README.md").read_text()
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "best" / "config.json").exists()


def test_resume_from_a_mid_run_checkpoint_repeats_the_later_losses(toy_pairs, tmp_path):
    train(small(toy_pairs, tmp_path / "full"))
    full = losses(tmp_path / "full")
    assert sorted(full) == [1, 2, 3, 4, 5, 6]
    middle = tmp_path / "full" / "checkpoints" / "checkpoint-3"
    train(small(toy_pairs, tmp_path / "resumed", resume_from_checkpoint=str(middle)))
    resumed = losses(tmp_path / "resumed")
    assert sorted(resumed) == [4, 5, 6]
    assert resumed == pytest.approx({s: full[s] for s in (4, 5, 6)}, rel=1e-5)


def test_nan_loss_stops_with_the_step(toy_pairs, tmp_path):
    with pytest.raises(FloatingPointError, match="at step 2"):
        train(small(toy_pairs, tmp_path, learning_rate=float("inf"), max_steps=3, warmup_steps=0))


@pytest.mark.integration
@pytest.mark.parametrize("config", ["cpu_2proc.yaml", "cpu_zero2_2proc.yaml"])
def test_two_process_runs(toy_pairs, tmp_path, config):
    launch(
        config,
        str(REPO / "recipes" / "train_reward.py"),
        "--config",
        str(REPO / "recipes/configs/reward/toy.yaml"),
        "--dataset",
        str(toy_pairs),
        "--output_dir",
        str(tmp_path),
        "--max_steps",
        "3",
        "--batch_size",
        "4",
        "--eval_steps",
        "0",
        "--checkpointing_steps",
        "0",
        "--warmup_steps",
        "0",
        "--report_to",
        "none",
    )
    metrics = json.loads((tmp_path / "final" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    # the rate decays linearly over the 3 optimizer steps, whatever the number of processes
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    rate = {row["step"]: row["train/lr"] for row in rows if "train/lr" in row}
    lr = yaml.safe_load((REPO / "recipes/configs/reward/toy.yaml").read_text())["learning_rate"]
    assert rate == pytest.approx({1: lr * 2 / 3, 2: lr / 3, 3: 0.0})
    assert metrics["distributed_type"] == ("DEEPSPEED" if "zero2" in config else "MULTI_CPU")
