import numpy as np
import pytest

from eval.winrate import outcomes, win_rate
from reward.evaluate import bootstrap_interval


def test_ties_count_half():
    assert outcomes([3, 1, 2, 0], [1, 1, 3, 0]).tolist() == [1.0, 0.5, 0.0, 0.5]
    rate = win_rate([3, 1, 2, 0], [1, 1, 3, 0])
    assert rate.estimate == 0.5 and (rate.wins, rate.ties, rate.losses) == (1, 2, 1)


def test_win_rate_is_symmetric():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 4, 300), rng.integers(0, 4, 300)
    assert win_rate(a, b).estimate + win_rate(b, a).estimate == pytest.approx(1.0)


def test_interval_contains_the_estimate_and_shrinks_with_data():
    rng = np.random.default_rng(1)
    small = win_rate(rng.integers(0, 4, 50), rng.integers(0, 3, 50))
    large = win_rate(rng.integers(0, 4, 2000), rng.integers(0, 3, 2000))
    for rate in (small, large):
        assert rate.low <= rate.estimate <= rate.high
    assert large.high - large.low < small.high - small.low


def test_clear_winner_interval_excludes_half():
    rate = win_rate([3] * 80 + [0] * 20, [1] * 100)
    assert rate.estimate == 0.8 and rate.low > 0.5
    assert bootstrap_interval([1.0] * 10) == (1.0, 1.0)


def test_unpaired_scores_are_refused():
    with pytest.raises(ValueError, match="paired"):
        win_rate([1, 2], [1, 2, 3])


def test_toy_judging_takes_held_out_splits_only():
    from eval.oracle import aligned_vs_base

    with pytest.raises(ValueError, match="'validation' or 'test', got 'train'"):
        aligned_vs_base("unused", "unused", split="train")  # the bases trained on these prompts


def test_judging_several_folders_matches_judging_each_alone(tmp_path):
    """A run's checkpoints judged in one call (base sampled once): each report is the one a call
    for that folder alone gives, so no folder's LoRA leaks into the next one's samples."""
    import torch
    from diffusers import DiffusionPipeline

    from align.lora import add_lora, lora_parameters, save_lora
    from eval.oracle import aligned_vs_base
    from tests.conftest import REPO

    base = REPO / "align" / "assets" / "toy" / "sd"
    folders = []
    for k in range(2):
        unet = DiffusionPipeline.from_pretrained(base).unet
        add_lora(unet, rank=4)
        generator = torch.Generator().manual_seed(k)
        with torch.no_grad():
            for p in lora_parameters(unet):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
        folders.append(tmp_path / f"checkpoint-{k}")
        save_lora(unet, folders[-1])
    kwargs = dict(prompts=6, seeds_per_prompt=1, steps=10, device="cpu", split="validation")
    together = aligned_vs_base(base, folders, **kwargs)
    alone = [aligned_vs_base(base, folder, **kwargs) for folder in folders]
    assert together == alone
    assert together[0]["aligned"] != together[1]["aligned"]  # the two LoRAs draw differently
    assert together[1]["aligned_folder"] == str(folders[1])
