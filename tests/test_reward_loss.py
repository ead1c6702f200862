import math

import numpy as np
import pytest
import torch

from pickalign.reward.evaluate import accuracy_report, choose_threshold, pair_scores, predict
from pickalign.reward.losses import in_batch_negatives_loss, preference_loss


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_tie_loss_is_zero_at_equal_scores_and_positive_otherwise():
    assert preference_loss(t(1.3), t(1.3), t(0.5), t(0.5)).item() == pytest.approx(0.0, abs=1e-7)
    assert preference_loss(t(2.0), t(0.0), t(0.5), t(0.5)).item() > 0


def test_winner_loss_matches_hand_computation():
    # softmax(2, 0)[0] = sigmoid(2); loss = -log sigmoid(2) = log(1 + e^-2)
    expected = math.log(1 + math.exp(-2))
    assert preference_loss(t(2.0), t(0.0), t(1.0), t(0.0)).item() == pytest.approx(
        expected, rel=1e-6
    )
    assert preference_loss(t(0.0), t(2.0), t(0.0), t(1.0)).item() == pytest.approx(
        expected, rel=1e-6
    )


def test_weights_average_examples():
    losses = [math.log(1 + math.exp(-2)), math.log(1 + math.exp(2))]  # right, then wrong
    got = preference_loss(t(2.0, 2.0), t(0.0, 0.0), t(1.0, 0.0), t(0.0, 1.0), weights=t(1.0, 0.25))
    assert got.item() == pytest.approx((losses[0] + 0.25 * losses[1]) / 1.25, rel=1e-6)


def test_in_batch_negatives_reduces_to_the_pair_loss_for_one_prompt():
    torch.manual_seed(0)
    text, a, b = (torch.nn.functional.normalize(torch.randn(1, 8), dim=-1) for _ in range(3))
    scale = torch.tensor(10.0)
    pairwise = preference_loss(
        scale * (text * a).sum(-1), scale * (text * b).sum(-1), t(1.0), t(0.0)
    )
    batched = in_batch_negatives_loss(text, a, b, t(1.0), t(0.0), scale)
    assert batched.item() == pytest.approx(pairwise.item(), rel=1e-5)
    # with a second prompt in the batch, its images add negatives: the loss can only grow
    text2 = torch.cat([text, torch.nn.functional.normalize(torch.randn(1, 8), dim=-1)])
    a2, b2 = torch.cat([a, torch.randn(1, 8)]), torch.cat([b, torch.randn(1, 8)])
    more = in_batch_negatives_loss(text2[:1].repeat(2, 1), a2, b2, t(1.0, 1.0), t(0.0, 0.0), scale)
    assert more.item() > pairwise.item()


def test_protocol_scores_and_threshold():
    assert predict([0.9, 0.52, 0.1], threshold=0.1).tolist() == [1.0, 0.5, 0.0]
    # match 1, exactly one side a tie 0.5, opposite 0
    assert pair_scores([1.0, 0.5, 1.0, 0.5], [1.0, 1.0, 0.0, 0.5]).tolist() == [1.0, 0.5, 0.0, 1.0]
    p0 = np.array([0.9, 0.8, 0.52, 0.49, 0.2])
    labels = np.array([1.0, 1.0, 0.5, 0.5, 0.0])
    threshold = choose_threshold(p0, labels)
    assert 0.04 <= threshold < 0.6  # calls the two near-even pairs ties, no others
    report = accuracy_report(p0, labels, p0, labels)
    assert report["accuracy"] == 1.0 and report["accuracy_no_ties"] == 1.0
    assert report["test_pairs_without_ties"] == 3
    low, high = report["accuracy_ci95"]
    assert low <= report["accuracy"] <= high
