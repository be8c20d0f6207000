"""Control Adapter math on a single `ControlAdapter`: transforms, inverses, per-token classes, config validation."""

import pytest
import torch

from craft.adapters import ControlAdapter, ControlAdapterConfig, control_adapters, resolve_layers
from craft.errors import UserError

HIDDEN = 16


def randomize_adapters(module, seed=0, spectral_norm=0.5):
    """Give every Control Adapter in `module` random non-zero weights with ||W||_2 = `spectral_norm` (lowrank) or
    S ~ N(0, 0.3^2) with an orthonormal Q (symmetric)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in control_adapters(module):
            for param in adapter.parameters():
                param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float64).to(param.dtype) * 0.3)
            if adapter.type == "symmetric":
                adapter.Q.copy_(torch.linalg.qr(adapter.Q.double())[0].to(adapter.Q.dtype))
            else:
                norm = torch.linalg.matrix_norm(adapter.weight_matrix().double(), ord=2)
                adapter.B.mul_(spectral_norm / norm.item())


def make_adapter(seed=0, dtype=torch.float64, **overrides):
    torch.manual_seed(seed)
    adapter = ControlAdapter(HIDDEN, ControlAdapterConfig(**{"rank": 4, **overrides}), layer_index=0).to(dtype)
    randomize_adapters(adapter, seed)
    return adapter


def dense_transform(adapter, direction):
    """(I + W) or its inverse, from the dense W and torch.linalg."""
    eye = torch.eye(HIDDEN, dtype=torch.float64)
    w = adapter.weight_matrix().double() * adapter.strength
    return eye + w if direction == 1 else torch.linalg.inv(eye + w)


def apply(adapter, delta, classes):
    adapter.classes = classes
    return adapter(delta)


@pytest.mark.parametrize("kind", ["lowrank", "symmetric"])
def test_plus_one_is_identity_plus_w_and_exact_minus_one_inverts_it(kind):
    adapter = make_adapter(type=kind)
    delta = torch.randn(3, 5, HIDDEN, dtype=torch.float64)
    plus = apply(adapter, delta, 1)
    torch.testing.assert_close(plus, delta @ dense_transform(adapter, 1).T, rtol=0, atol=1e-12)
    back = apply(adapter, plus, -1)
    torch.testing.assert_close(back, delta, rtol=0, atol=1e-5)
    torch.testing.assert_close(apply(adapter, delta, -1), delta @ dense_transform(adapter, -1).T, rtol=0, atol=1e-12)


def test_float32_round_trip_within_1e5():
    adapter = make_adapter(dtype=torch.float32)
    delta = torch.randn(4, 7, HIDDEN)
    torch.testing.assert_close(apply(adapter, apply(adapter, delta, 1), -1), delta, rtol=0, atol=1e-5)


def test_symmetric_exact_inverse_is_exp_minus_s_form():
    adapter = make_adapter(type="symmetric")
    q, s = adapter.Q.detach(), adapter.S.detach()
    closed_form = torch.eye(HIDDEN, dtype=torch.float64) + q @ torch.diag(torch.exp(-s) - 1) @ q.T
    torch.testing.assert_close(dense_transform(adapter, -1), closed_form, rtol=0, atol=1e-12)
    delta = torch.randn(6, HIDDEN, dtype=torch.float64)
    torch.testing.assert_close(apply(adapter, delta, -1), delta @ closed_form.T, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["lowrank", "symmetric"])
@pytest.mark.parametrize("order", [1, 2, 4, 7])
def test_neumann_error_equals_series_remainder(order, kind):
    adapter = make_adapter(inverse="neumann", neumann_order=order, type=kind)
    delta = torch.randn(5, HIDDEN, dtype=torch.float64)
    w = adapter.weight_matrix()
    exact = dense_transform(adapter, -1)
    remainder = torch.linalg.matrix_power(-w, order + 1) @ exact  # (I+W)^-1 - sum_{k<=n} (-W)^k
    error = delta @ exact.T - apply(adapter, delta, -1)
    torch.testing.assert_close(error, delta @ remainder.T, rtol=0, atol=1e-12)
    assert error.abs().max() > 1e-9  # the truncation is visible, so the comparison is not vacuous


def test_mixed_classes_equal_each_class_alone_per_position():
    adapter = make_adapter(inverse="exact")
    delta = torch.randn(2, 6, HIDDEN, dtype=torch.float64)
    classes = torch.tensor([[1, -1, 0, 1, 0, -1], [0, 0, 1, -1, -1, 1]])
    mixed = apply(adapter, delta, classes)
    for value in (-1, 0, 1):
        alone = apply(adapter, delta, value)
        torch.testing.assert_close(mixed[classes == value], alone[classes == value], rtol=0, atol=1e-12)
    torch.testing.assert_close(apply(adapter, delta, 0), delta, rtol=0, atol=0)


def test_strength_scales_w_and_effective_factors_match_dense():
    adapter = make_adapter()
    adapter.strength = 0.5
    delta = torch.randn(4, HIDDEN, dtype=torch.float64)
    for direction in (1, -1):
        expected = delta @ dense_transform(adapter, direction).T
        torch.testing.assert_close(apply(adapter, delta, direction), expected, rtol=0, atol=1e-12)
        a, b, s = adapter.effective_factors(direction, strength=0.5)
        torch.testing.assert_close(torch.eye(HIDDEN, dtype=torch.float64) + s * b @ a, dense_transform(adapter, direction))


def test_class_tensor_shape_mismatch_is_a_user_error():
    adapter = make_adapter()
    with pytest.raises(UserError, match="control_classes has shape"):
        apply(adapter, torch.randn(2, 5, HIDDEN, dtype=torch.float64), torch.ones(2, 4, dtype=torch.long))


def test_init_is_identity_and_scale_is_rslora():
    torch.manual_seed(0)
    config = ControlAdapterConfig(rank=16)
    adapter = ControlAdapter(64, config, 0)
    assert config.scale == pytest.approx(16 ** 0.5 / 16)
    assert torch.count_nonzero(adapter.weight_matrix()) == 0 and adapter.A.abs().sum() > 0
    symmetric = ControlAdapter(64, ControlAdapterConfig(rank=8, type="symmetric"), 0)
    torch.testing.assert_close(symmetric.Q.T @ symmetric.Q, torch.eye(8), atol=1e-5, rtol=0)
    assert torch.count_nonzero(symmetric.weight_matrix()) == 0


@pytest.mark.parametrize("field, value", [
    ("rank", 0), ("alpha", -1.0), ("dropout", 1.0), ("target", "attn"), ("type", "dense"), ("inverse", "lu"),
    ("neumann_order", 0), ("gamma", 2.0), ("class0_lambda", -1.0), ("dtype", "float16"),
    ("layers_to_transform", "3:1"), ("layers_to_transform", 1.5),
])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(UserError, match=field):
        ControlAdapterConfig(**{field: value})


def test_layers_to_transform_forms():
    assert resolve_layers(None, 4) == [0, 1, 2, 3]
    assert resolve_layers("1:2", 4) == [1, 2]  # inclusive at both ends
    assert resolve_layers(3, 4) == [3]
    assert resolve_layers([2, 0], 4) == [0, 2]
    with pytest.raises(UserError, match="layers_to_transform"):
        resolve_layers("0:4", 4)


def test_unsupported_model_type_is_a_user_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    from craft.adapters import add_control_adapters

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16))
    with pytest.raises(UserError, match="'gpt2' is not supported"):
        add_control_adapters(model, ControlAdapterConfig(rank=2))


def test_dropout_acts_on_the_adapter_input_in_training_only():
    adapter = make_adapter(dropout=0.5)
    delta = torch.randn(3, 8, HIDDEN, dtype=torch.float64)
    w = adapter.weight_matrix()
    adapter.train()
    torch.manual_seed(7)
    dropped = apply(adapter, delta, 1)
    torch.manual_seed(7)
    kept = torch.nn.functional.dropout(torch.ones_like(delta), p=0.5)  # the same mask, scaled by 1/(1-p)
    torch.testing.assert_close(dropped, delta + (delta * kept) @ w.T, rtol=0, atol=1e-12)
    assert not torch.allclose(dropped, delta + delta @ w.T)
    adapter.eval()
    torch.testing.assert_close(apply(adapter, delta, 1), delta + delta @ w.T, rtol=0, atol=1e-12)
