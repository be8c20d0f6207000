"""Control Adapters on every supported family: identity at init, and equality with a weight-edited base model."""

import pytest
import torch
from torch import nn

from craft.adapters import (
    ControlAdapterConfig, FAMILIES, add_control_adapters, classes_for_positions, control_adapters, control_class,
    decoder_layers, remove_control_adapters,
)
from craft.testing import FAMILIES as TEST_FAMILIES
from craft.testing import tiny_model
from test_control_adapters import randomize_adapters

INPUT_IDS = torch.tensor([[1, 17, 42, 99, 5, 230, 64, 7, 300, 12], [1, 8, 250, 33, 71, 6, 120, 9, 44, 2]])


def adapted(family, seed=0, **config):
    model = tiny_model(family)
    add_control_adapters(model, ControlAdapterConfig(**{"rank": 4, **config}))
    randomize_adapters(model, seed)
    return model


class _Linear(nn.Module):
    """x -> x @ M^T: the reference's explicit (I + W) or (I + W)^-1 after Gemma 2's post-sublayer norm."""

    def __init__(self, matrix):
        super().__init__()
        self.matrix = matrix

    def forward(self, x):
        return (x.double() @ self.matrix.T).to(x.dtype)


def edited_base(family, transforms):
    """The base model with each residual projection P replaced by M_i @ P (layer i), or — for families whose
    residual write passes through a norm after the sublayer (Gemma 2) — with M_i applied after that norm."""
    model = tiny_model(family)
    facts = FAMILIES[family]
    with torch.no_grad():
        for index, layer in enumerate(decoder_layers(model)):
            if index not in transforms:
                continue
            matrix = transforms[index]
            if facts.norm_after_sublayer:
                for name in facts.write_points:
                    layer.set_submodule(name, nn.Sequential(layer.get_submodule(name), _Linear(matrix)))
                continue
            for name in facts.residual_projections:
                owner_name, _, attr = name.rpartition(".")
                target = getattr(layer.get_submodule(owner_name), attr)
                weight = target.weight if isinstance(target, nn.Linear) else target  # fused experts: (E, h, inter)
                weight.copy_((matrix @ weight.double()).to(weight.dtype))
                if isinstance(target, nn.Linear) and target.bias is not None:
                    target.bias.copy_((matrix @ target.bias.double()).to(target.bias.dtype))
    return model


def layer_transforms(model, direction):
    eye = torch.eye(model.config.hidden_size, dtype=torch.float64)
    out = {}
    for adapter in control_adapters(model):
        m = eye + adapter.weight_matrix().double()
        out[adapter.layer_index] = m if direction == 1 else torch.linalg.inv(m)
    return out


def test_fixture_families_are_the_supported_families():
    assert set(TEST_FAMILIES) == set(FAMILIES)


@pytest.mark.parametrize("family", TEST_FAMILIES)
@pytest.mark.parametrize("target", ["sublayers", "block"])
def test_identity_at_init_is_exact(family, target):
    base = tiny_model(family)
    model = add_control_adapters(tiny_model(family), ControlAdapterConfig(rank=4, target=target))
    expected = base(INPUT_IDS).logits
    assert torch.equal(model(INPUT_IDS).logits, expected)
    assert torch.equal(model(INPUT_IDS, control_classes=torch.tensor([[1, -1, 0, 1, 0, -1, 1, 1, -1, 0]] * 2)).logits,
                       expected)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".control_adapter." in n for n in trainable)


@pytest.mark.parametrize("family", TEST_FAMILIES)
def test_sublayers_equal_base_with_transformed_residual_projections(family):
    model = adapted(family, layers_to_transform="1")
    assert [a.layer_index for a in control_adapters(model)] == [1]
    for direction in (1, -1):
        reference = edited_base(family, layer_transforms(model, direction))(INPUT_IDS).logits
        with control_class(model, direction):
            logits = model(INPUT_IDS).logits
        assert (logits - tiny_model(family)(INPUT_IDS).logits).abs().max() > 1e-2  # the adapter does something
        torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_block_target_transforms_the_whole_layer_delta(family):
    """Each adapted layer's output equals h + (I+W)(base_layer(h) - h) for its actual input h."""
    model = adapted(family, target="block")
    base_layers = decoder_layers(tiny_model(family))
    calls = []
    for index, layer in enumerate(decoder_layers(model)):
        layer.register_forward_hook(
            lambda module, args, kwargs, out, i=index: calls.append((i, args, kwargs, out)), with_kwargs=True)
    model(INPUT_IDS, use_cache=False)
    for index, args, kwargs, out in calls:
        hidden = args[0] if args else kwargs["hidden_states"]
        base_out = base_layers[index](*args, **kwargs)
        matrix = layer_transforms(model, 1)[index].float()
        torch.testing.assert_close(out, hidden + (base_out - hidden) @ matrix.T, rtol=1e-5, atol=1e-5)
    assert len(calls) == len(base_layers)


@pytest.mark.parametrize("family", ["cohere", "cohere2"])
def test_parallel_blocks_block_and_sublayer_targets_coincide(family):
    logits = {}
    for target in ("sublayers", "block"):
        with control_class(adapted(family, target=target), -1) as model:
            logits[target] = model(INPUT_IDS).logits
    torch.testing.assert_close(logits["sublayers"], logits["block"], rtol=1e-5, atol=1e-5)


def test_rows_with_different_classes_equal_each_row_alone():
    model = adapted("llama")
    classes = torch.tensor([[1] * 10, [-1] * 10])
    mixed = model(INPUT_IDS, control_classes=classes).logits
    for row, value in enumerate((1, -1)):
        with control_class(model, value):
            torch.testing.assert_close(mixed[row], model(INPUT_IDS[row:row + 1]).logits[0], rtol=1e-5, atol=1e-5)


def test_position_classes_follow_the_predicted_token():
    """Token classes [0]*4 + [1]*6 (prompt, response): position 3 predicts the first response token, so it is the
    first position that differs from an all-neutral run; earlier positions are unaffected (causal model)."""
    model = adapted("llama")
    token_classes = torch.tensor([[0] * 4 + [1] * 6] * 2)
    positions = classes_for_positions(token_classes)
    assert positions[0].tolist() == [0, 0, 0] + [1] * 7
    logits = model(INPUT_IDS, control_classes=positions).logits
    neutral = model(INPUT_IDS, control_classes=0).logits
    torch.testing.assert_close(logits[:, :3], neutral[:, :3], rtol=0, atol=0)
    assert (logits[:, 3] - neutral[:, 3]).abs().max() > 1e-3
    with control_class(model, 1):
        plus = model(INPUT_IDS).logits
    assert (logits[:, 3:] - plus[:, 3:]).abs().max() > 1e-3  # later positions still see neutral prompt states


def test_plain_forward_defaults_to_plus_one_and_context_restores():
    model = adapted("qwen2")
    default = model(INPUT_IDS).logits
    with control_class(model, -1, strength=0.5):
        half_negative = model(INPUT_IDS).logits
    torch.testing.assert_close(model(INPUT_IDS, control_classes=1).logits, default, rtol=0, atol=0)
    torch.testing.assert_close(model(INPUT_IDS).logits, default, rtol=0, atol=0)
    assert (half_negative - default).abs().max() > 1e-3


def test_remove_control_adapters_restores_base():
    model = adapted("mixtral")
    remove_control_adapters(model)
    assert not list(control_adapters(model))
    torch.testing.assert_close(model(INPUT_IDS).logits, tiny_model("mixtral")(INPUT_IDS).logits, rtol=0, atol=0)


def test_cached_generation_uses_the_context_class():
    """Greedy decoding with the KV cache under control_class(-1) equals greedy argmax over full -1 forwards."""
    model = adapted("llama")
    prompt = INPUT_IDS[:1, :5]
    with control_class(model, -1):
        generated = model.generate(prompt, max_new_tokens=4, do_sample=False)
        sequence = prompt
        for _ in range(4):
            next_token = model(sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
    assert torch.equal(generated, sequence)
    with control_class(model, 1):
        assert not torch.equal(model.generate(prompt, max_new_tokens=4, do_sample=False), generated)


def test_deepcopy_hooks_drive_the_copy_s_own_adapters():
    import copy

    model = adapted("llama")
    before = model(INPUT_IDS).logits
    clone = copy.deepcopy(model)
    randomize_adapters(clone, seed=5)
    torch.testing.assert_close(model(INPUT_IDS).logits, before, rtol=0, atol=0)
    reference = edited_base("llama", layer_transforms(clone, 1))(INPUT_IDS).logits
    torch.testing.assert_close(clone(INPUT_IDS).logits, reference, rtol=1e-5, atol=1e-5)
