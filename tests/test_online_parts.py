"""Pieces of the online methods: rewards named by a string, and advantage normalisation."""

import sys

import numpy as np
import pytest
import torch

from pickalign.align.advantages import PromptStats, group_advantages
from pickalign.reward.registry import load_reward
from pickalign.reward.toyworld import Attributes, render

RED_CIRCLE = Attributes("red", "circle", "blue")


def lengths(prompts, images):  # a plug-in reward, named as tests.test_online_parts:lengths
    return [float(len(p)) for p in prompts]


def test_rewards_by_name(tiny_models, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    images = [render(RED_CIRCLE, rng), render(Attributes("green", "square", "yellow"), rng)]
    oracle = load_reward("toy-oracle")
    assert oracle.score(RED_CIRCLE.prompt, images).tolist() == [3.0, 0.0]
    plug_in = load_reward("tests.test_online_parts:lengths")
    assert plug_in.score(["ab", "abc"], images).tolist() == [2.0, 3.0]
    pickscore = load_reward(f"pickscore:{tiny_models['clip']}")
    tensors = torch.stack([torch.from_numpy(np.array(i)).permute(2, 0, 1) / 255 for i in images])
    scores = pickscore.score(RED_CIRCLE.prompt, tensors)
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    for bad in ("nonsense", "tests.test_online_parts:missing", "no_such_module:f"):
        with pytest.raises(ValueError, match="reward"):
            load_reward(bad)
    # a module beside the user's config imports from the current directory, which does not
    # stay on the import path
    (tmp_path / "team_reward.py").write_text(
        "def score(prompts, images):\n    return [7.0] * len(images)\n"
    )
    monkeypatch.chdir(tmp_path)
    before = list(sys.path)
    assert load_reward("team_reward:score").score("a", images).tolist() == [7.0, 7.0]
    assert sys.path == before


def test_group_advantages_standardise_within_each_group():
    rewards = torch.tensor([1.0, 3.0, 10.0, 10.0, 20.0, 5.0])
    groups = ["a", "a", "b", "b", "b", "c"]
    advantages = group_advantages(rewards, groups)
    torch.testing.assert_close(advantages[:2], torch.tensor([-1.0, 1.0]), atol=1e-5, rtol=0)
    b = rewards[2:5]
    torch.testing.assert_close(
        advantages[2:5], (b - b.mean()) / (b.std(unbiased=False) + 1e-6), atol=1e-6, rtol=0
    )
    assert advantages[5] == 0  # a group of one has nothing to compare with
    torch.testing.assert_close(
        group_advantages(rewards, groups, use_std=False)[:2], torch.tensor([-1.0, 1.0])
    )


def test_prompt_stats_use_the_batch_until_a_prompt_has_enough_history_and_survive_a_resume():
    stats = PromptStats(buffer_size=4, min_count=3)
    first = stats.advantages(["a", "a", "b"], torch.tensor([1.0, 2.0, 6.0]))
    batch = torch.tensor([1.0, 2.0, 6.0])  # under min_count: standardised by the whole batch
    torch.testing.assert_close(first, (batch - batch.mean()) / (batch.std(unbiased=False) + 1e-6))
    second = stats.advantages(["a"], torch.tensor([3.0]))  # "a" now holds 1, 2, 3
    history = torch.tensor([1.0, 2.0, 3.0])
    expected = (3.0 - history.mean()) / (history.std(unbiased=False) + 1e-6)
    assert second.item() == pytest.approx(expected.item(), rel=1e-5)
    resumed = PromptStats()
    resumed.load_state_dict(stats.state_dict())
    a, b = (
        stats.advantages(["a"], torch.tensor([9.0])),
        resumed.advantages(["a"], torch.tensor([9.0])),
    )
    assert a.item() == b.item() and list(resumed.buffers["a"]) == [1.0, 2.0, 3.0, 9.0]
    resumed.advantages(["a"], torch.tensor([5.0]))  # the buffer keeps the last 4
    assert list(resumed.buffers["a"]) == [2.0, 3.0, 9.0, 5.0]
    with pytest.raises(ValueError, match="min_count 5 is more than buffer_size 4"):
        PromptStats(buffer_size=4, min_count=5)


def test_ppo_clip_loss_by_hand_and_its_gradient_stops_outside_the_clip():
    from pickalign.align.losses import ppo_clip_loss

    old = torch.tensor([0.0, 0.0, 0.0])
    new = torch.tensor([0.05, -0.05, 0.001], requires_grad=True)  # ratios e^0.05, e^-0.05, ~1
    advantages = torch.tensor([1.0, 1.0, -9.0])
    terms = ppo_clip_loss(new, old, advantages, clip_range=0.01, advantage_clip=5.0)
    ratio = new.detach().exp()
    a = torch.tensor([1.0, 1.0, -5.0])  # -9 clipped to -5
    expected = torch.maximum(-a * ratio, -a * ratio.clamp(0.99, 1.01)).mean()
    assert terms.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert terms.clip_fraction.item() == pytest.approx(2 / 3)
    assert terms.approx_kl.item() == pytest.approx(0.5 * (0.05**2 * 2 + 0.001**2) / 3, rel=1e-5)
    terms.loss.backward()
    # Sample 1: ratio above 1 + c with A > 0 -> clipped, no gradient. Sample 2: ratio below
    # 1 - c with A > 0 -> the unclipped term is larger, gradient -A * r / 3. Sample 3: inside.
    assert new.grad[0] == 0
    assert new.grad[1].item() == pytest.approx(-(ratio[1] / 3).item(), rel=1e-5)
    assert new.grad[2].item() == pytest.approx((5.0 * ratio[2] / 3).item(), rel=1e-5)


def test_a_group_is_one_draw_of_group_size_samples_even_when_a_prompt_comes_twice():
    from pickalign.align.ddpo import DDPOConfig, advantages_for_round

    config = DDPOConfig(advantages="group", group_size=2, samples_per_round=4, train_batch_size=4)
    rewards = torch.tensor([1.0, 3.0, 10.0, 20.0])
    advantages = advantages_for_round(config, None, ["a", "a", "a", "a"], rewards)
    torch.testing.assert_close(advantages, torch.tensor([-1.0, 1.0, -1.0, 1.0]), atol=1e-5, rtol=0)


def test_gaussian_kl_by_hand_and_only_the_policy_gets_its_gradient():
    from pickalign.align.losses import gaussian_kl

    mean = torch.zeros(2, 1, 2, 2, requires_grad=True)
    reference = torch.tensor([1.0, 1.0, 1.0, 3.0]).reshape(1, 1, 2, 2).repeat(2, 1, 1, 1)
    reference.requires_grad_(True)
    std = torch.tensor([1.0, 0.5])
    kl = gaussian_kl(mean, reference, std)
    # mean squared difference (1 + 1 + 1 + 9) / 4 = 3, over 2 std^2: 3 / 2 and 3 / 0.5
    torch.testing.assert_close(kl, torch.tensor([1.5, 6.0]))
    assert gaussian_kl(reference, reference, std).abs().max() == 0
    kl.sum().backward()
    # d/d mean of (mean - ref)^2 / 4 / (2 std^2) = (mean - ref) / (4 std^2)
    torch.testing.assert_close(mean.grad[0].flatten(), -reference[0].detach().flatten() / 4)
    torch.testing.assert_close(mean.grad[1].flatten(), -reference[1].detach().flatten())
    assert reference.grad is None
