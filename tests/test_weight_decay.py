"""Composite decoupled weight decay (Control Adapters and PEFT LoRA), orthogonality step, adapter statistics."""

import warnings

import pytest
import torch

from craft.adapters import (
    ControlAdapterConfig, adapter_stats, add_control_adapters, composite_weight_decay_, control_adapter_factor_pairs,
    control_adapters, lora_factor_pairs, orthogonality_step_,
)
from craft.testing import tiny_model
from test_control_adapters import randomize_adapters


def dense_decay(a, b, s, lr, weight_decay):
    """The defining formulas with the dense W: A -= lr*wd*s*B^T W, B -= lr*wd*s*W A^T, both from the old W."""
    w = s * b.double() @ a.double()
    return a.double() - lr * weight_decay * s * b.double().T @ w, b.double() - lr * weight_decay * s * w @ a.double().T


def test_scalar_hand_example():
    a, b = torch.tensor([[2.0]]), torch.tensor([[3.0]])
    (amount,) = composite_weight_decay_([(a, b, 0.5)], lr=0.1, weight_decay=2.0)
    # W = 0.5*3*2 = 3; A = 2 - 0.2*0.5*3*3 = 1.1; B = 3 - 0.2*0.5*3*2 = 2.4; W' = 0.5*2.4*1.1 = 1.32
    assert a.item() == pytest.approx(1.1) and b.item() == pytest.approx(2.4)
    assert amount == pytest.approx(3 - 1.32)


def test_control_adapter_pairs_follow_the_closed_form():
    model = add_control_adapters(tiny_model("llama"), ControlAdapterConfig(rank=4))
    randomize_adapters(model)
    pairs = control_adapter_factor_pairs(model)
    assert len(pairs) == 2 and all(s == pytest.approx(0.5) for _, _, s in pairs)
    old = [(a.detach().clone(), b.detach().clone(), s) for a, b, s in pairs]
    amounts = composite_weight_decay_(pairs, lr=0.05, weight_decay=3.0)
    for (a, b, s), (a0, b0, _), amount in zip(pairs, old, amounts):
        expected_a, expected_b = dense_decay(a0, b0, s, 0.05, 3.0)
        torch.testing.assert_close(a.double(), expected_a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.double(), expected_b, rtol=1e-5, atol=1e-6)
        dense_change = s * (b.double() @ a.double() - b0.double() @ a0.double())
        assert amount == pytest.approx(torch.linalg.matrix_norm(dense_change).item(), rel=1e-4)
    stats = adapter_stats(model)
    assert stats["weight_decay_max"] == pytest.approx(max(amounts))
    assert stats["weight_decay_avg"] == pytest.approx(sum(amounts) / len(amounts))


def test_peft_lora_pairs_follow_the_closed_form():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(1)
    pairs = lora_factor_pairs(model)
    assert len(pairs) == 4 and all(s == pytest.approx(2.0) for _, _, s in pairs)
    with torch.no_grad():
        for _, b, _ in pairs:
            b.copy_(torch.randn(b.shape, generator=generator) * 0.1)
    old = [(a.detach().clone(), b.detach().clone(), s) for a, b, s in pairs]
    composite_weight_decay_(pairs, lr=0.1, weight_decay=1.5)
    for (a, b, s), (a0, b0, _) in zip(pairs, old):
        expected_a, expected_b = dense_decay(a0, b0, s, 0.1, 1.5)
        torch.testing.assert_close(a.double(), expected_a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.double(), expected_b, rtol=1e-5, atol=1e-6)
    assert adapter_stats(model)["norm_max"] > 0  # LoRA models are monitored too


def test_bf16_pairs_warn_once_and_are_skipped():
    pairs = [(torch.ones(2, 3, dtype=torch.bfloat16), torch.ones(3, 2, dtype=torch.bfloat16), 1.0) for _ in range(3)]
    with pytest.warns(UserWarning, match="skipped for 3") as record:
        assert composite_weight_decay_(pairs, lr=0.1, weight_decay=10.0) == []
    assert len(record) == 1
    assert all(torch.equal(a, torch.ones_like(a)) and torch.equal(b, torch.ones_like(b)) for a, b, _ in pairs)


def test_stats_norms_match_dense_linear_algebra():
    model = add_control_adapters(tiny_model("mistral"), ControlAdapterConfig(rank=4, type="symmetric"))
    randomize_adapters(model)
    with torch.no_grad():
        model.model.layers[0].control_adapter.Q.add_(0.05)  # off orthonormal
    stats = adapter_stats(model)
    matrices = [a.weight_matrix().double() for a in control_adapters(model)]
    frobenius = [torch.linalg.matrix_norm(w).item() for w in matrices]
    assert stats["norm_max"] == pytest.approx(max(frobenius), rel=1e-5)
    assert stats["norm_avg"] == pytest.approx(sum(frobenius) / 2, rel=1e-5)
    assert stats["spectral_norm_max"] == pytest.approx(max(torch.linalg.matrix_norm(w, 2).item() for w in matrices),
                                                       rel=1e-5)
    assert stats["orthogonality_error"] > 0.01


def test_orthogonality_step_reduces_error():
    model = add_control_adapters(tiny_model("llama"), ControlAdapterConfig(rank=4, type="symmetric", gamma=0.1))
    with torch.no_grad():
        for adapter in control_adapters(model):
            adapter.Q.mul_(1.2).add_(0.02 * torch.randn_like(adapter.Q))
    before = adapter_stats(model)["orthogonality_error"]
    errors = [orthogonality_step_(model) for _ in range(5)]
    assert errors[0] < before and all(later < earlier for earlier, later in zip(errors, errors[1:]))
    assert errors[-1] < 0.5 * before


def test_neumann_warning_when_spectral_norm_reaches_one():
    model = add_control_adapters(tiny_model("llama"), ControlAdapterConfig(rank=4, inverse="neumann"))
    randomize_adapters(model, spectral_norm=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapter_stats(model)  # ||W||_2 < 1: silent
    randomize_adapters(model, spectral_norm=1.1)
    with pytest.warns(UserWarning, match="Neumann"):
        assert adapter_stats(model)["spectral_norm_max"] >= 1
