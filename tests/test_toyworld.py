import numpy as np
import pytest
from PIL import Image

from pickalign.reward.toyworld import (
    ATTRIBUTE_NAMES,
    Attributes,
    adherence,
    all_attributes,
    judge,
    parse_prompt,
    prefer,
    prompt_splits,
    read_image,
    render,
)

RED_CIRCLE = Attributes("red", "circle", "blue")


def test_oracle_reads_its_own_renders():
    rng = np.random.default_rng(123)
    combos = all_attributes()
    truth = [combos[i] for i in rng.integers(len(combos), size=300)]
    read = [read_image(render(a, rng)) for a in truth]
    assert sum(t == r for t, r in zip(truth, read)) / len(truth) >= 0.99


@pytest.mark.parametrize("shape", ["circle", "square", "triangle", "cross", "diamond"])
def test_every_shape_is_told_apart(shape):
    rng = np.random.default_rng(0)
    for colour, background in [("yellow", "black"), ("white", "purple"), ("orange", "red")]:
        attributes = Attributes(colour, shape, background)
        assert read_image(render(attributes, rng)) == attributes


def test_swapped_colours_fail_colour_and_background_only():
    image = render(Attributes("blue", "circle", "red"), np.random.default_rng(1))
    verdict = judge(RED_CIRCLE.prompt, image)
    assert verdict.satisfied == {"colour": False, "shape": True, "background": False}
    assert verdict.score == 1 and not verdict.all_correct


def test_preference_winner_loser_and_tie():
    rng = np.random.default_rng(2)
    good, also_good = render(RED_CIRCLE, rng), render(RED_CIRCLE, rng)
    wrong_shape = render(Attributes("red", "square", "blue"), rng)
    assert prefer(RED_CIRCLE.prompt, good, wrong_shape) == (1.0, 0.0)
    assert prefer(RED_CIRCLE.prompt, wrong_shape, good) == (0.0, 1.0)
    assert prefer(RED_CIRCLE.prompt, good, also_good) == (0.5, 0.5)
    wrong_colour = render(Attributes("green", "circle", "blue"), rng)
    assert prefer(RED_CIRCLE.prompt, wrong_colour, wrong_shape) == (0.5, 0.5)  # both 2 of 3


def test_blank_image_has_no_object():
    blank = Image.new("RGB", (32, 32), (35, 60, 215))
    assert read_image(blank) is None
    verdict = judge(RED_CIRCLE, blank)
    assert verdict.score == 0 and verdict.satisfied["background"] is False


def test_larger_images_are_read_too():
    image = render(Attributes("pink", "triangle", "green"), np.random.default_rng(3), size=96)
    assert read_image(image) == Attributes("pink", "triangle", "green")


def test_prompts_parse_and_bad_ones_are_refused():
    assert parse_prompt("a red circle on a blue background") == RED_CIRCLE
    assert parse_prompt("an orange cross on a white background").colour == "orange"
    with pytest.raises(ValueError, match="not a toy-world prompt"):
        parse_prompt("a red circle on a red carpet")


def test_prompt_splits_are_disjoint_and_fixed():
    splits = prompt_splits()
    sizes = {k: len(v) for k, v in splits.items()}
    assert sizes == {"train": 200, "validation": 50, "test": 200}
    train, val, test = (set(splits[k]) for k in ("train", "validation", "test"))
    assert not (train & val) and not (train & test) and not (val & test)
    assert prompt_splits() == splits
    assert all(a.colour != a.background for a in all_attributes()) and len(all_attributes()) == 450


def test_adherence_figures():
    rng = np.random.default_rng(4)
    verdicts = [
        judge(RED_CIRCLE, render(RED_CIRCLE, rng)),  # 3 of 3
        judge(RED_CIRCLE, render(Attributes("red", "square", "blue"), rng)),  # 2 of 3
        judge(RED_CIRCLE, Image.new("RGB", (32, 32), "white")),  # unreadable: 0 of 3
        judge(RED_CIRCLE, render(Attributes("green", "cross", "blue"), rng)),  # 1 of 3
    ]
    figures = adherence(verdicts)
    assert figures["all_correct"] == 0.25 and figures["mean_attributes"] == 6 / 12
    assert figures["unreadable"] == 0.25
    assert [figures[a] for a in ATTRIBUTE_NAMES] == [0.5, 0.25, 0.75]


def test_oracle_reward_counts_attributes_for_pil_arrays_and_tensors():
    import torch

    from pickalign.reward.toyworld import OracleReward

    rng = np.random.default_rng(0)
    wanted = Attributes("red", "circle", "blue")
    images = [
        render(wanted, rng),
        render(Attributes("green", "circle", "blue"), rng),  # colour wrong
        render(Attributes("green", "square", "yellow"), rng),  # all wrong
    ]
    scores = OracleReward().score(wanted.prompt, images)
    assert scores.tolist() == [3.0, 2.0, 0.0]
    arrays = [np.array(image) for image in images]
    tensors = [torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in arrays]
    assert OracleReward().score([wanted.prompt] * 3, arrays).tolist() == [3.0, 2.0, 0.0]
    assert OracleReward().score(wanted.prompt, tensors).tolist() == [3.0, 2.0, 0.0]
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        OracleReward().score([wanted.prompt] * 2, images)
