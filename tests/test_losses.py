"""Pooling, projection head and InfoNCE, checked against hand-computed values and an explicit reference."""

import math

import pytest
import torch
import torch.nn.functional as F

from craft.errors import UserError
from craft.losses import InfoNCELoss, ProjectionHead, pool_hidden_states


def _hidden():
    # hidden[b, t] = [100 b + t, 100 b + 10 t]
    b = torch.arange(3, dtype=torch.float64).view(3, 1)
    t = torch.arange(5, dtype=torch.float64).view(1, 5)
    return torch.stack([100 * b + t, 100 * b + 10 * t], dim=-1)


# row 0: right padding; row 1: left padding; row 2: a span mask that starts (and ends) mid-sequence
MASK = torch.tensor([[1, 1, 1, 0, 0],
                     [0, 0, 1, 1, 1],
                     [0, 0, 1, 1, 0]])

EXPECTED = {
    "last_token": [[2, 20], [104, 140], [203, 230]],
    "cls": [[0, 0], [102, 120], [202, 220]],
    "mean": [[1, 10], [103, 130], [202.5, 225]],
    # weights 1..n over the masked positions: row 0 -> (0·1 + 1·2 + 2·3) / 6 = 4/3, row 1 -> 2 + 4/3, row 2 -> 2 + 2/3
    "weighted_mean": [[4 / 3, 40 / 3], [100 + 10 / 3, 100 + 100 / 3], [200 + 8 / 3, 200 + 80 / 3]],
}


@pytest.mark.parametrize("strategy", list(EXPECTED))
def test_pooling_matches_hand_computed_values(strategy):
    pooled = pool_hidden_states(_hidden(), MASK, strategy)
    torch.testing.assert_close(pooled, torch.tensor(EXPECTED[strategy], dtype=torch.float64), rtol=0, atol=1e-12)


def test_pooling_accepts_bool_masks_and_none():
    hidden = _hidden()
    torch.testing.assert_close(pool_hidden_states(hidden, MASK.bool(), "last_token"),
                               pool_hidden_states(hidden, MASK, "last_token"))
    torch.testing.assert_close(pool_hidden_states(hidden, None, "last_token"), hidden[:, -1])
    torch.testing.assert_close(pool_hidden_states(hidden, None, "cls"), hidden[:, 0])
    torch.testing.assert_close(pool_hidden_states(hidden, None, "mean"), hidden.mean(dim=1))


def test_pooling_errors_name_the_empty_row_and_the_valid_strategies():
    mask = MASK.clone()
    mask[1] = 0
    with pytest.raises(UserError, match=r"row 1\b"):
        pool_hidden_states(_hidden(), mask, "mean")
    with pytest.raises(UserError, match="last_token, mean, cls, weighted_mean"):
        pool_hidden_states(_hidden(), MASK, "max")
    with pytest.raises(UserError, match="shape"):
        pool_hidden_states(_hidden(), MASK[:, :4], "mean")


def test_pooling_passes_gradient_only_to_pooled_positions():
    hidden = _hidden().float().requires_grad_()
    pool_hidden_states(hidden, MASK, "last_token").sum().backward()
    touched = hidden.grad.abs().sum(-1) != 0
    assert touched.tolist() == [[False, False, True, False, False], [False, False, False, False, True],
                                [False, False, False, True, False]]


def _reference_infonce(anchor, positive, negatives, temperature):
    """Explicit double loop over anchors and candidates, in float64 Python math."""
    candidates = positive.tolist() + ([] if negatives is None else negatives.tolist())

    def cos(u, v):
        return sum(x * y for x, y in zip(u, v)) / math.sqrt(sum(x * x for x in u) * sum(y * y for y in v))

    total = 0.0
    for i, a in enumerate(anchor.tolist()):
        sims = [cos(a, c) / temperature for c in candidates]
        total += -sims[i] + math.log(sum(math.exp(s) for s in sims))
    return total / anchor.shape[0]


@pytest.mark.parametrize("num_negatives", [0, 5])
def test_infonce_matches_explicit_reference(num_negatives):
    gen = torch.Generator().manual_seed(0)
    anchor, positive = torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen)
    negatives = torch.randn(num_negatives, 8, generator=gen) if num_negatives else None
    loss_fn = InfoNCELoss(temperature=0.1)
    loss, logits = loss_fn(anchor, positive, negatives, return_logits=True)
    assert logits.shape == (4, 4 + num_negatives)
    assert loss.item() == pytest.approx(_reference_infonce(anchor, positive, negatives, 0.1), rel=1e-5)
    # and against cross_entropy on manually built logits
    cands = positive if negatives is None else torch.cat([positive, negatives])
    manual = torch.stack([torch.stack([F.cosine_similarity(a, c, dim=0) for c in cands]) for a in anchor]) / 0.1
    torch.testing.assert_close(logits, manual, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, F.cross_entropy(manual, torch.arange(4)), rtol=1e-5, atol=1e-6)


def test_infonce_defaults_and_learnable_temperature_gets_a_gradient():
    assert InfoNCELoss().temperature == pytest.approx(0.05)
    assert InfoNCELoss().pooling == "last_token"
    assert list(InfoNCELoss().parameters()) == []

    loss_fn = InfoNCELoss(temperature=0.07, learnable_temperature=True)
    assert loss_fn.temperature == pytest.approx(0.07)
    assert loss_fn.log_temperature.item() == pytest.approx(math.log(0.07))
    gen = torch.Generator().manual_seed(1)
    anchor = torch.randn(6, 16, generator=gen, requires_grad=True)
    positive = torch.randn(6, 16, generator=gen)
    loss = loss_fn(anchor, positive)
    assert loss.item() == pytest.approx(_reference_infonce(anchor.detach(), positive, None, 0.07), rel=1e-5)
    loss.backward()
    assert loss_fn.log_temperature.grad is not None and loss_fn.log_temperature.grad.abs().item() > 0
    assert anchor.grad.abs().sum() > 0

    with torch.no_grad():
        loss_fn.log_temperature.fill_(math.log(0.001))  # beyond the CLIP clamp of 1/tau <= 100
    assert loss_fn.temperature == pytest.approx(0.01)
    with pytest.raises(UserError):
        InfoNCELoss(temperature=0.005, learnable_temperature=True)
    with pytest.raises(UserError):
        InfoNCELoss(temperature=0.0)


def test_infonce_pool_uses_its_strategy():
    loss_fn = InfoNCELoss(pooling="mean")
    torch.testing.assert_close(loss_fn.pool(_hidden(), MASK), pool_hidden_states(_hidden(), MASK, "mean"))


def test_projection_head_shapes_dropout_and_gradients():
    torch.manual_seed(0)
    head = ProjectionHead(32, output_dim=8, dropout=0.5)
    assert (head.fc1.in_features, head.fc1.out_features, head.fc2.out_features) == (32, 32, 8)
    assert ProjectionHead(32, 8, hidden_dim=12).fc1.out_features == 12
    x = torch.randn(4, 32)
    assert head(x).shape == (4, 8)
    head.eval()
    torch.testing.assert_close(head(x), head(x))
    torch.testing.assert_close(head(x), F.normalize(head.fc2(F.gelu(head.fc1(x))), dim=-1))
    head.train()
    assert not torch.allclose(head(x), head(x))  # dropout active in training
    head.zero_grad()
    head(x).pow(2).sum().backward()
    for layer in (head.fc1, head.fc2):
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("strategy", ["mean", "weighted_mean"])
def test_pooling_long_bf16_sequences_keep_exact_weights(strategy):
    # bf16 counts exactly only up to 256: weights must not be accumulated in the hidden dtype
    gen = torch.Generator().manual_seed(3)
    # values that grow with the position, so wrong position weights show in the result
    hidden = torch.linspace(1.0, 8.0, 700).view(1, 700, 1) + 0.1 * torch.randn(2, 700, 8, generator=gen)
    mask = torch.ones(2, 700, dtype=torch.long)
    mask[1, :200] = 0
    reference = pool_hidden_states(hidden.double(), mask, strategy)
    pooled = pool_hidden_states(hidden.bfloat16(), mask, strategy)
    assert pooled.dtype == torch.bfloat16
    torch.testing.assert_close(pooled.double(), reference, rtol=2e-2, atol=0)
