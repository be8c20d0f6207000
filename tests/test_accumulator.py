"""The exact-alpha arithmetic alone: weights, window counting, and the summed-gradient identity on a toy problem."""

import doctest

import pytest
import torch

import craft.accumulator as accumulator
from craft.accumulator import AccumulationScaler, WindowCounts, count_window, sft_target_count


def _sft(labels):
    return {"labels": torch.tensor(labels), "craft_batch_type": "sft"}


CONTRASTIVE = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "craft_batch_type": "contrastive"}


def test_docstring_example():
    assert doctest.testmod(accumulator).failed == 0


def test_sft_target_count_uses_shifted_labels():
    batch = _sft([[5, -100, 7, 8], [9, 9, -100, -100]])
    assert sft_target_count(batch) == 3  # position 0 of each row is never a target
    assert sft_target_count(batch, labels_are_shifted_by_model=False) == 5
    assert sft_target_count({"shift_labels": torch.tensor([[1, -100, 2]])}) == 2


def test_count_window_contrastive_batches_do_not_dilute_sft_tokens():
    window = [_sft([[1, 2, 3]]), CONTRASTIVE, _sft([[1, -100, 4, 5]]), CONTRASTIVE]
    assert count_window(window, self_align=False) == WindowCounts(sft_tokens=4, contrastive_terms=2)
    # self-align: every SFT micro-batch is also one InfoNCE term; its tokens still count once
    assert count_window(window, self_align=True) == WindowCounts(sft_tokens=4, contrastive_terms=4)
    assert count_window([{"labels": torch.tensor([[1, 2]])}], self_align=False).sft_tokens == 1  # untagged = SFT


@pytest.mark.parametrize("counts,expected", [
    (WindowCounts(10, 4), (0.6 * 2 / 10, 0.4 * 2 / 4)),
    (WindowCounts(0, 4), (0.0, 0.4 * 2 / 4)),      # no SFT micro-batch: the SFT term is absent
    (WindowCounts(10, 0), (0.6 * 2 / 10, 0.0)),    # no contrastive micro-batch
])
def test_weights(counts, expected):
    scaler = AccumulationScaler(0.6, counts, world_size=2)
    assert (scaler.sft_token_weight, scaler.contrastive_term_weight) == pytest.approx(expected, rel=1e-15)


def test_micro_batch_loss_needs_a_part():
    with pytest.raises(ValueError):
        AccumulationScaler(0.5, WindowCounts(1, 1)).micro_batch_loss()


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.9, 1.0])
def test_summed_micro_batch_gradients_equal_objective_gradient(alpha):
    """Uneven micro-batches: sum of backward(loss_b) == grad[alpha * token-mean NLL + (1-alpha) * mean InfoNCE]."""
    torch.manual_seed(0)
    w = torch.randn(5, requires_grad=True)
    token_losses = [torch.randn(n, 5) for n in (3, 7, 1)]  # per-token "nll" = x @ w**2, three SFT micro-batches
    con_inputs = [torch.randn(4, 5) for _ in range(2)]       # two contrastive micro-batches

    def nll(x):
        return (x @ w ** 2).exp()

    def infonce(x):
        return (x @ w).tanh().mean()

    scaler = AccumulationScaler(alpha, WindowCounts(sft_tokens=11, contrastive_terms=2))
    for x in token_losses:
        scaler.micro_batch_loss(sft_token_sum=nll(x).sum()).backward()
    for x in con_inputs:
        scaler.micro_batch_loss(contrastive_loss=infonce(x)).backward()
    accumulated = w.grad.clone()

    w.grad = None
    l_sft = torch.cat([nll(x) for x in token_losses]).mean()
    l_con = torch.stack([infonce(x) for x in con_inputs]).mean()
    (alpha * l_sft + (1 - alpha) * l_con).backward()
    torch.testing.assert_close(accumulated, w.grad, rtol=1e-6, atol=1e-7)
