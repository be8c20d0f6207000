"""Packed batches: CRAFTCollator(padding_free=True) emits TRL's padding-free batch, and pooling per packed
conversation equals pooling each conversation alone."""

from __future__ import annotations

import pytest
import torch

from craft.data import CRAFTCollator
from craft.errors import UserError
from craft.losses import POOLING_STRATEGIES, pool_hidden_states
from craft.packing import is_packed, packed_segments

COLLATE = CRAFTCollator(pad_token_id=3)


# ------------------------------------------------------------------------------------------------ packing

PACKED_ROWS = [
    {"input_ids": [5, 6, 7, 8, 9, 30, 31], "labels": [-100, 6, 7, -100, 9, -100, 31], "seq_lengths": [3, 2, 2]},
    {"input_ids": [10, 11, 12, 13], "labels": [-100, -100, 12, 13], "seq_lengths": [4]},
    {"input_ids": [14, 15, 16]},  # no seq_lengths: one conversation; no labels: every token
]


@pytest.mark.parametrize("multiple", [None, 4, 16])
def test_padding_free_collator_emits_trls_batch(multiple):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    trl_rows = [{"labels": r["input_ids"], "seq_lengths": [len(r["input_ids"])], **r} for r in PACKED_ROWS]
    expected = DataCollatorForLanguageModeling(pad_token_id=3, padding_free=True, pad_to_multiple_of=multiple)(
        trl_rows)
    got = CRAFTCollator(pad_token_id=3, padding_free=True, pad_to_multiple_of=multiple)(PACKED_ROWS)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value) if torch.is_tensor(value) else got[key] == value, key
    assert got["position_ids"][0, :14].tolist() == [0, 1, 2, 0, 1, 0, 1, 0, 1, 2, 3, 0, 1, 2]
    assert is_packed(got) and not is_packed(COLLATE(PACKED_ROWS[:2]))


def test_padding_free_collator_errors_name_the_feature():
    collator = CRAFTCollator(pad_token_id=3, padding_free=True)
    with pytest.raises(UserError, match="feature 0 has seq_lengths \\[3, 3\\]"):
        collator([{"input_ids": [1, 2, 3, 4, 5], "seq_lengths": [3, 3]}])
    with pytest.raises(UserError, match="paired contrastive row .*feature 1"):
        collator([{"input_ids": [1]}, {"input_ids": [1], "input_ids_tgt": [2]}])
    with pytest.raises(UserError, match="'labels' of feature 0 has length 1"):
        collator([{"input_ids": [1, 2], "labels": [1]}])


@pytest.mark.parametrize("strategy", POOLING_STRATEGIES)
def test_segment_pooling_equals_pooling_each_conversation_alone(strategy):
    """Two packed rows holding 3 + 2 conversations: pooling with `rows` gives, per conversation, what pooling the
    conversation's own [1, T_s] slice gives."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 8, 5, generator=gen)
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 0, 1, 2, 3]])
    span = torch.tensor([[0, 1, 1, 1, 1, 0, 1, 1], [1, 0, 1, 1, 0, 0, 1, 1]])
    rows, (masks,) = packed_segments(position_ids, span)
    assert rows.tolist() == [0, 0, 0, 1, 1]
    pooled = pool_hidden_states(hidden, masks, strategy, rows=rows)
    bounds = [(0, 0, 3), (0, 3, 5), (0, 5, 8), (1, 0, 4), (1, 4, 8)]
    for s, (row, start, end) in enumerate(bounds):
        alone = pool_hidden_states(hidden[row:row + 1, start:end], span[row:row + 1, start:end], strategy)
        torch.testing.assert_close(pooled[s], alone[0])
