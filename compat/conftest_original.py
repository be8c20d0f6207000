"""Run contrastive-ft 0.4.3's own test suite offline against this package (copied next to its tests by
`compat/run_original_tests.py`; not part of `make test`).

The original tests load the hub tokenizer ``gpt2``; here that one name resolves to the local test tokenizer of
`craft.testing` (byte-level BPE, ids unk 0, bos 1, eos 2, pad 3), so nothing touches the network. Every other
name goes to the real ``from_pretrained``.
"""

import pytest


@pytest.fixture(autouse=True, scope="session")
def _local_gpt2_tokenizer():
    from transformers import AutoTokenizer

    from craft.testing import make_tokenizer

    original = AutoTokenizer.from_pretrained.__func__

    def from_pretrained(cls, name, *args, **kwargs):
        if name == "gpt2":
            return make_tokenizer()
        return original(cls, name, *args, **kwargs)

    AutoTokenizer.from_pretrained = classmethod(from_pretrained)
    yield
    AutoTokenizer.from_pretrained = classmethod(original)
