"""The final-norm hook captures exactly HF's last hidden state, for every family, plain and PEFT-wrapped."""

import pytest
import torch
from torch import nn

from craft.errors import UserError
from craft.hooks import LastHiddenStateCapture, find_final_norm
from craft.testing import FAMILIES, tiny_model

IDS = torch.tensor([[1, 40, 41, 42, 43, 2], [3, 3, 1, 50, 51, 52]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])  # the second row is left padded


def _assert_capture_matches(model):
    with torch.no_grad():
        expected = model(input_ids=IDS, attention_mask=MASK, output_hidden_states=True).hidden_states[-1]
        with LastHiddenStateCapture(model) as cap:
            model(input_ids=IDS, attention_mask=MASK)
        assert cap.calls == 1
    assert cap.hidden.shape == expected.shape
    torch.testing.assert_close(cap.hidden, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_equals_last_output_hidden_state(family):
    model = tiny_model(family)
    assert find_final_norm(model) is model.model.norm
    _assert_capture_matches(model)
    assert not model.model.norm._forward_hooks  # removed on exit


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_through_peft_lora(family):
    from peft import LoraConfig, get_peft_model

    base = tiny_model(family)
    norm = base.model.norm
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    assert find_final_norm(model) is norm
    assert find_final_norm(model.base_model) is norm
    _assert_capture_matches(model)


def test_gradients_flow_through_the_captured_tensor():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with LastHiddenStateCapture(model) as cap:
        model(input_ids=IDS, attention_mask=MASK)
    assert cap.hidden.requires_grad
    cap.hidden[:, -1].pow(2).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)


def test_layer_norm_model_with_an_unusual_layout_is_found_by_name():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)).eval()
    assert find_final_norm(model) is model.transformer.ln_f
    with torch.no_grad():
        expected = model(input_ids=IDS % 64, output_hidden_states=True).hidden_states[-1]
        with LastHiddenStateCapture(model) as cap:
            model(input_ids=IDS % 64)
    torch.testing.assert_close(cap.hidden, expected, rtol=0, atol=1e-6)


class _NoNormLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 16)
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16))])
        self.lm_head = nn.Linear(16, 64)

    def forward(self, input_ids):
        return self.lm_head(self.layers[0](self.embed(input_ids)))


def test_no_recognisable_final_norm_raises_instead_of_falling_back():
    with pytest.raises(UserError, match="craft_use_hidden_state_hook=False"):
        find_final_norm(_NoNormLM())
    model = tiny_model("llama")
    model.model.norm = nn.Identity()  # not a norm; the per-layer norms must not be taken instead
    with pytest.raises(UserError, match="cannot find the final norm"):
        LastHiddenStateCapture(model)


def test_reading_before_a_forward_is_a_clear_error():
    model = tiny_model("qwen2")
    with LastHiddenStateCapture(model) as cap:
        with pytest.raises(RuntimeError, match="no hidden state was captured"):
            cap.hidden
