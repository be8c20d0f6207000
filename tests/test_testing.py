"""The offline fixtures themselves: every family builds, is deterministic, and round-trips through a local dir."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from craft.testing import FAMILIES, make_tokenizer, save_tiny_model, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_round_trips_through_a_local_directory(family, tmp_path):
    path = save_tiny_model(tmp_path / family, family)
    reloaded = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    ids = torch.tensor([[1, 40, 41, 42, 43, 2]])
    expected = tiny_model(family)(ids).logits
    torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(path).pad_token_id == 3


def test_tokenizer_is_trained_locally_and_round_trips():
    tok = make_tokenizer()
    text = "The capital of France is Paris."
    assert tok.decode(tok(text)["input_ids"]) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 3)
    assert len(tok) == 384
