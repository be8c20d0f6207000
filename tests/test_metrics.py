"""Contrastive accuracy and the EMA representation-consistency reference."""

import math

import pytest
import torch

from craft.metrics import EMAReference, contrastive_accuracy


def test_contrastive_accuracy_counts_diagonal_argmax():
    logits = torch.tensor([[5.0, 1.0, 0.0, 0.0],   # right (column 0)
                           [2.0, 1.0, 0.0, 3.0],   # wrong: an extra negative wins
                           [0.0, 0.0, 9.0, 1.0]])  # right (column 2)
    assert contrastive_accuracy(logits) == pytest.approx(2 / 3)
    assert contrastive_accuracy(torch.eye(4)) == 1.0
    assert contrastive_accuracy(torch.tensor([[0.0, 0.0, 1.0]] * 3)) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        contrastive_accuracy(torch.zeros(3, 2))


def test_first_consistency_initialises_reference_and_returns_one():
    ema = EMAReference(decay=0.9)
    emb = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    value = ema.representation_consistency(emb)
    assert value == 1.0 and not math.isnan(value)
    # reference = mean of the normalised rows = ([0.6, 0.8] + [0, 1]) / 2
    torch.testing.assert_close(ema.reference, torch.tensor([0.3, 0.9]))


def test_ema_update_and_cosine_against_hand_computed_values():
    ema = EMAReference(decay=0.5)
    ema.update(torch.tensor([[2.0, 0.0]]))          # ref = [1, 0]
    torch.testing.assert_close(ema.reference, torch.tensor([1.0, 0.0]))
    ema.update(torch.tensor([[0.0, 5.0]]))          # ref = 0.5 [1, 0] + 0.5 [0, 1]
    torch.testing.assert_close(ema.reference, torch.tensor([0.5, 0.5]))
    # batch mean direction [0, 1] vs reference [0.5, 0.5]: cos = 1/sqrt(2)
    assert ema.representation_consistency(torch.tensor([[0.0, 3.0]])) == pytest.approx(1 / math.sqrt(2), rel=1e-6)
    assert ema.representation_consistency(torch.tensor([[1.0, 1.0], [7.0, 7.0]])) == pytest.approx(1.0, rel=1e-6)
    assert ema.representation_consistency(torch.tensor([[-1.0, -1.0]])) == pytest.approx(-1.0, rel=1e-6)


def test_ema_ignores_gradients_and_round_trips_state():
    ema = EMAReference()
    emb = torch.randn(4, 8, requires_grad=True)
    ema.update(emb)
    assert not ema.reference.requires_grad
    other = EMAReference(decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.99
    torch.testing.assert_close(other.reference, ema.reference)
    with pytest.raises(ValueError):
        EMAReference(decay=1.0)
