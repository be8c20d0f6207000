"""Packed (padding-free) batches: several conversations in one sequence, kept apart by their ``position_ids``.

TRL's ``SFTTrainer`` with ``packing=True`` (strategy ``"bfd"``, the default) or ``padding_free=True`` packs rows
into ``input_ids`` of up to ``max_length`` tokens with a ``seq_lengths`` column, and its collator flattens a
micro-batch of B such rows into ONE sequence ``[1, N]`` (N = total tokens) with:

* ``position_ids`` [1, N] restarting at 0 at every conversation: attention kernels and transformers' mask
  builder derive the block-diagonal (per-conversation) causal mask from these resets, so no conversation sees
  another;
* ``labels`` [1, N] with -100 at every conversation start (position 0 is never predicted from the previous
  conversation's last token);
* ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (int32 [S+1], the conversation boundaries), ``max_length_q`` /
  ``max_length_k`` (longest conversation) and ``seq_idx`` (int32 [1, N], conversation index of each token) for
  the varlen kernels;
* no ``attention_mask`` (an all-ones mask would hide the resets from the mask builder).

`collate_padding_free` builds exactly that batch (plus the assistant-mask column when rows have one), so the SFT
loss of a CRAFT micro-batch is TRL's. `packed_segments` recovers the conversations of a packed batch, so
self-align pools each of them as its own anchor / positive.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from craft.errors import UserError


def _row_tensor(row: Mapping[str, Any], column: str, index: int) -> Tensor:
    value = row[column]
    tensor = value if isinstance(value, Tensor) else torch.as_tensor(value)
    if tensor.dim() != 1:
        raise UserError(f"padding-free collation: column {column!r} of feature {index} must be a 1-D sequence of "
                        f"token values; got shape {tuple(tensor.shape)}")
    return tensor.long()


def _positions(lengths: Sequence[int], total: int, index: int) -> Tensor:
    """[total] positions restarting at 0 at each conversation of a row with conversation ``lengths``."""
    if sum(lengths) != total or any(n <= 0 for n in lengths):
        raise UserError(f"padding-free collation: feature {index} has seq_lengths {list(lengths)} (sum "
                        f"{sum(lengths)}) for {total} input_ids; each must be > 0 and they must add up")
    return torch.cat([torch.arange(n) for n in lengths])


def collate_padding_free(features: Sequence[Mapping[str, Any]], pad_token_id: int, *,
                         pad_to_multiple_of: int | None = None, assistant_mask_key: str = "assistant_mask",
                         label_pad_token_id: int = -100) -> dict[str, Any]:
    """Flatten rows (``input_ids``, optional ``labels``, ``seq_lengths`` and assistant mask) into one packed
    sequence, with the keys TRL's padding-free collator emits (module docstring). Rows without ``labels`` learn
    every token; rows without ``seq_lengths`` are one conversation each."""
    ids, labels, positions, masks = [], [], [], []
    has_mask = any(assistant_mask_key in row for row in features)
    for i, row in enumerate(features):
        if any(str(column).endswith("_tgt") for column in row):
            raise UserError("padding-free collation packs SFT rows only; a paired contrastive row (with *_tgt "
                            f"columns, feature {i}) needs the padded CRAFTCollator (padding_free=False)")
        if "input_ids" not in row:
            raise UserError(f"padding-free collation: feature {i} has no 'input_ids' column")
        row_ids = _row_tensor(row, "input_ids", i)
        ids.append(row_ids)
        labels.append(_row_tensor(row, "labels", i) if "labels" in row else row_ids.clone())
        lengths = row.get("seq_lengths")
        positions.append(_positions([len(row_ids)] if lengths is None else [int(n) for n in lengths], len(row_ids), i))
        if has_mask:
            if assistant_mask_key not in row:
                raise UserError(f"padding-free collation: feature {i} has no {assistant_mask_key!r} column while "
                                "others have it")
            masks.append(_row_tensor(row, assistant_mask_key, i))
        for column in ("labels", assistant_mask_key):
            if column in row and len(row[column]) != len(row_ids):
                raise UserError(f"padding-free collation: column {column!r} of feature {i} has length "
                                f"{len(row[column])} but its input_ids has length {len(row_ids)}")
    total = sum(len(row) for row in ids)
    length = total if not pad_to_multiple_of else -(-total // pad_to_multiple_of) * pad_to_multiple_of

    def flat(rows: list[Tensor], value: int) -> Tensor:
        out = torch.full((1, length), value, dtype=torch.long)
        out[0, :total] = torch.cat(rows)
        return out

    batch: dict[str, Any] = {"input_ids": flat(ids, pad_token_id), "labels": flat(labels, label_pad_token_id),
                             "position_ids": flat(positions, 0)}
    batch["labels"][batch["position_ids"] == 0] = label_pad_token_id  # never predict across a boundary
    if has_mask:
        batch[assistant_mask_key] = flat(masks, 0)
    starts = (batch["position_ids"][0] == 0).nonzero().flatten()
    cu_seq_lens = torch.cat([starts, torch.tensor([length])]).to(torch.int32)
    batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu_seq_lens
    batch["max_length_q"] = batch["max_length_k"] = int(cu_seq_lens.diff().max())
    batch["seq_idx"] = torch.repeat_interleave(torch.arange(cu_seq_lens.numel() - 1, dtype=torch.int32),
                                               cu_seq_lens.diff())[None]
    return batch


def is_packed(batch: Mapping[str, Any]) -> bool:
    """Whether a collated batch holds packed conversations: ``position_ids`` that restart inside a row."""
    positions = batch.get("position_ids")
    return isinstance(positions, Tensor) and positions.dim() == 2 and bool((positions[:, 1:] == 0).any())


def packed_segments(position_ids: Tensor, *masks: Tensor) -> tuple[Tensor, list[Tensor]]:
    """The conversations of a packed batch: ``(rows [S], [mask_s [S, T] for each of masks])``.

    A conversation starts where ``position_ids`` [B, T] is 0. Segment ``s`` lies in row ``rows[s]``; each input
    mask [B, T] is restricted to it (``mask_s[s, t] = mask[rows[s], t]`` inside the segment, 0 elsewhere).
    Pooling with ``rows`` (`craft.losses.pool_hidden_states`) then gives one vector per conversation.
    """
    starts = (position_ids == 0).long()
    starts[:, 0] = 1  # a row always starts a conversation
    local = starts.cumsum(dim=1) - 1  # [B, T]: conversation index within the row
    per_row = local[:, -1] + 1  # [B]
    offsets = torch.cat([per_row.new_zeros(1), per_row.cumsum(0)[:-1]])
    segment = local + offsets[:, None]  # [B, T]: global conversation index
    count = int(per_row.sum())
    rows = torch.repeat_interleave(torch.arange(position_ids.shape[0], device=position_ids.device), per_row)
    member = segment[rows] == torch.arange(count, device=position_ids.device)[:, None]  # [S, T]
    return rows, [member & mask[rows].bool() for mask in masks]
