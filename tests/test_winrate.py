import numpy as np
import pytest

from pickalign.eval.winrate import outcomes, win_rate
from pickalign.reward.evaluate import bootstrap_interval


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
    from pickalign.eval.toy.judge import aligned_vs_base

    with pytest.raises(ValueError, match="'validation' or 'test', got 'train'"):
        aligned_vs_base("unused", "unused", split="train")  # the bases trained on these prompts


def test_judging_several_folders_matches_judging_each_alone(tmp_path):
    """A run's checkpoints judged in one call (base sampled once): each report is the one a call
    for that folder alone gives, so no folder's LoRA leaks into the next one's samples."""
    import torch
    from diffusers import DiffusionPipeline

    from pickalign.align.lora import add_lora, lora_parameters, save_lora
    from pickalign.eval.toy.judge import aligned_vs_base
    from tests.conftest import REPO

    base = REPO / "eval" / "toy" / "assets" / "sd"
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


def test_compare_counts_fixed_and_broken_attributes():
    """The win rate nets fixes against breakages; the per-attribute counts keep both."""
    from pickalign.eval.toy.judge import oracle_compare
    from pickalign.reward.toyworld import Attributes, render

    rng = np.random.default_rng(4)
    right = Attributes("red", "circle", "blue")
    wrong_shape = Attributes("red", "square", "blue")
    wrong_background = Attributes("red", "circle", "green")
    # A fixes the shape on three images and breaks the background on two; one image is a tie.
    shown_a = [right] * 3 + [wrong_background] * 2 + [right]
    shown_b = [wrong_shape] * 3 + [right] * 2 + [right]
    result = oracle_compare(
        [right.prompt] * 6, [render(a, rng) for a in shown_a], [render(b, rng) for b in shown_b]
    )
    assert result["changes"] == {
        "colour": {"fixed": 0, "broken": 0},
        "shape": {"fixed": 3, "broken": 0},
        "background": {"fixed": 0, "broken": 2},
    }
    rate = result["win_rate"]
    assert (rate.wins, rate.ties, rate.losses) == (3, 1, 2)


def test_toy_run_judging_writes_metrics_and_card(tmp_path, capsys):
    """After a toy run the report lands in metrics.json and a line in the model card; a LoRA
    that changes nothing (zero-initialised B) ties with its base everywhere."""
    import json

    from diffusers import DiffusionPipeline

    from pickalign.align.lora import add_lora, save_lora
    from pickalign.eval.toy.judge import ToyJudgeConfig, judge_toy_run
    from tests.conftest import REPO

    base = REPO / "eval" / "toy" / "assets" / "sd"
    unet = DiffusionPipeline.from_pretrained(base).unet
    add_lora(unet, rank=4)
    final = tmp_path / "final"
    save_lora(unet, final)
    (final / "README.md").write_text("# card\n")
    (final / "metrics.json").write_text(json.dumps({"steps": 3}))
    published = {p.name: p.read_bytes() for p in final.iterdir()}
    judge = ToyJudgeConfig(
        toy_eval_prompts=3,
        toy_eval_seeds=1,
        toy_eval_steps=5,
        toy_eval_split="validation",
        toy_eval_reward="toy-oracle",
    )
    assert judge_toy_run(base, final, ToyJudgeConfig()) is None  # off unless asked
    report = judge_toy_run(base, final, judge)
    assert {p.name: p.read_bytes() for p in final.iterdir()} == published  # final/ untouched
    written = json.loads((tmp_path / "toy_eval.json").read_text())
    assert written == {**report, "summary": written["summary"]}
    assert report["win_rate"]["ties"] == 3 and report["win_rate"]["estimate"] == 0.5
    assert all(c == {"fixed": 0, "broken": 0} for c in report["changes"].values())
    # the reward scores the same images: here the oracle, whose mean is the adherence's
    scores = report["reward"]
    assert scores["name"] == "toy-oracle" and scores["base"] == scores["aligned"]
    assert scores["base"] == pytest.approx(
        sum(report["base"][k] for k in ("colour", "shape", "background"))
    )
    assert "win rate over the base 0.500" in written["summary"]
    assert "fixed / broken colour 0 / 0" in written["summary"]
    assert "3 held-out validation prompts" in capsys.readouterr().out
