"""CRAFT's padding collator: `CRAFTCollator` pads the anchor columns (``input_ids``, ``attention_mask``,
``labels``, the assistant mask, ``control_classes``) and the positive columns (``*_tgt``), each group to its own
length; with ``padding_free=True`` it emits TRL's packed batch for SFT rows (`craft.packing`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from craft.errors import UserError
from craft.packing import collate_padding_free


def _is_text(value: Any) -> bool:
    if isinstance(value, (str, bytes)):
        return True
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(v, (str, bytes)) for v in value)


def _as_tensor(value: Any) -> Tensor | None:
    """A tensor for a numeric value (number, list, array, tensor); None if it is not tensor-able."""
    if isinstance(value, Tensor):
        return value
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        return None


class CRAFTCollator:
    """Pads CRAFT micro-batches; ``__call__(features) -> dict[str, Tensor]``.

    Two groups of token columns are padded, each to its own longest row (rounded up to ``pad_to_multiple_of``):
    the anchor group (``input_ids`` with ``pad_token_id``, ``attention_mask`` with 0, ``labels`` with
    ``label_pad_token_id``, the assistant mask with 0, ``control_classes`` with 0) and the positive group (the same
    names with a ``_tgt`` suffix). Any other column whose rows have the length of their ``input_ids`` (or
    ``input_ids_tgt`` for ``*_tgt`` names) is padded the same way, with 0 (``label_pad_token_id`` for names
    starting with ``labels``). An absent attention mask is built as ones over each row's tokens.
    ``padding_side="left"`` puts the padding first. Other numeric columns are stacked; string columns are dropped.
    ``add_labels=True`` builds ``labels`` from ``input_ids`` (padding -> ``label_pad_token_id``) for rows that
    have none.

    ``padding_free=True`` (TRL's ``packing=True`` / ``padding_free=True``): the rows are flattened into one packed
    sequence [1, N] with per-conversation ``position_ids`` (restarting at every ``seq_lengths`` boundary), the
    varlen keys and no attention mask, exactly as TRL's own collator does (`craft.packing`). SFT rows only.
    """

    def __init__(self, pad_token_id: int = 0, label_pad_token_id: int = -100, pad_to_multiple_of: int | None = None,
                 padding_side: str = "right", assistant_mask_key: str = "assistant_mask", add_labels: bool = False,
                 padding_free: bool = False):
        if padding_side not in ("right", "left"):
            raise UserError(f"padding_side must be 'right' or 'left'; got {padding_side!r}")
        if pad_to_multiple_of is not None and int(pad_to_multiple_of) <= 0:
            raise UserError(f"pad_to_multiple_of must be a positive integer or None; got {pad_to_multiple_of!r}")
        self.pad_token_id = int(pad_token_id)
        self.label_pad_token_id = int(label_pad_token_id)
        self.pad_to_multiple_of = None if pad_to_multiple_of is None else int(pad_to_multiple_of)
        self.padding_side = padding_side
        self.assistant_mask_key = assistant_mask_key
        self.add_labels = bool(add_labels)
        self.padding_free = bool(padding_free)
        self._warned: set[str] = set()

    @staticmethod
    def _base(column: str) -> str:
        return column[: -len("_tgt")] if column.endswith("_tgt") else column

    def _long_columns(self) -> set[str]:
        return {"input_ids", "attention_mask", "labels", self.assistant_mask_key, "control_classes"}

    def _pad_value(self, column: str) -> int:
        base = self._base(column)
        if base == "input_ids":
            return self.pad_token_id
        if base.startswith("labels"):
            return self.label_pad_token_id
        return 0

    def _pad(self, rows: list[Tensor], length: int, value: int) -> Tensor:
        out = torch.full((len(rows), length), value, dtype=rows[0].dtype)
        for i, row in enumerate(rows):
            n = row.shape[0]
            if self.padding_side == "right":
                out[i, :n] = row
            else:
                out[i, length - n:] = row
        return out

    def __call__(self, features: list[Mapping[str, Any]]) -> dict[str, Tensor]:
        if not features:
            raise UserError("CRAFTCollator got an empty list of features")
        for i, row in enumerate(features):
            if not isinstance(row, Mapping):
                raise UserError(f"CRAFTCollator: feature {i} is a {type(row).__name__}, not a dict of columns")
        if self.padding_free:
            return collate_padding_free(features, self.pad_token_id, pad_to_multiple_of=self.pad_to_multiple_of,
                                        assistant_mask_key=self.assistant_mask_key,
                                        label_pad_token_id=self.label_pad_token_id)
        columns: list[str] = []
        for row in features:
            columns += [c for c in row if c not in columns]
        batch: dict[str, Tensor] = {}
        handled: set[str] = set()
        for suffix in ("", "_tgt"):
            ids_key = "input_ids" + suffix
            if ids_key not in columns:
                continue
            ids = self._token_rows(features, ids_key, None)
            lengths = [row.shape[0] for row in ids]
            length = max(lengths)
            if self.pad_to_multiple_of:
                length = math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of
            group = [ids_key]
            for column in columns:
                if column == ids_key or column.endswith("_tgt") != bool(suffix):
                    continue
                if self._base(column) in self._long_columns() or self._is_token_aligned(features, column, lengths):
                    group.append(column)
            for column in group:
                rows = ids if column == ids_key else self._token_rows(features, column, lengths)
                batch[column] = self._pad(rows, length, self._pad_value(column))
                handled.add(column)
            mask_key = "attention_mask" + suffix
            if mask_key not in batch:
                batch[mask_key] = self._pad([torch.ones(n, dtype=torch.long) for n in lengths], length, 0)
            labels_key = "labels" + suffix
            if self.add_labels and not suffix and labels_key not in batch:
                labels = batch[ids_key].clone()
                labels[batch[mask_key] == 0] = self.label_pad_token_id
                batch[labels_key] = labels
        for column in columns:
            if column in handled:
                continue
            value = self._other_column(features, column)
            if value is not None:
                batch[column] = value
        return batch

    def _token_rows(self, features, column: str, lengths: list[int] | None) -> list[Tensor]:
        rows = []
        for i, row in enumerate(features):
            if column not in row:
                if self._base(column) == "attention_mask" and lengths is not None:
                    rows.append(torch.ones(lengths[i], dtype=torch.long))  # built for rows that lack one
                    continue
                raise UserError(f"CRAFTCollator: feature {i} has no {column!r} column while others have it")
            value = _as_tensor(row[column])
            if value is None or value.dim() != 1:
                raise UserError(f"CRAFTCollator: column {column!r} of feature {i} must be a 1-D sequence of numbers")
            if self._base(column) in self._long_columns():
                value = value.long()
            if lengths is not None and value.shape[0] != lengths[i]:
                ids_key = "input_ids_tgt" if column.endswith("_tgt") else "input_ids"
                raise UserError(f"CRAFTCollator: column {column!r} of feature {i} has length {value.shape[0]} but "
                                f"its {ids_key} has length {lengths[i]}")
            rows.append(value)
        return rows

    @staticmethod
    def _is_token_aligned(features, column: str, lengths: list[int]) -> bool:
        for row, n in zip(features, lengths):
            value = row.get(column)
            if value is None or _is_text(value):
                return False
            if isinstance(value, Tensor):
                if value.dim() != 1 or value.shape[0] != n:
                    return False
            elif not isinstance(value, (list, tuple)) and not hasattr(value, "shape"):
                return False
            else:
                tensor = _as_tensor(value)
                if tensor is None or tensor.dim() != 1 or tensor.shape[0] != n:
                    return False
        return True

    def _other_column(self, features, column: str) -> Tensor | None:
        values = [row.get(column) for row in features]
        if all(v is None or _is_text(v) for v in values):
            return None  # text columns are dropped
        missing = [i for i, row in enumerate(features) if column not in row]
        if missing:
            raise UserError(f"CRAFTCollator: feature {missing[0]} has no {column!r} column while others have it")
        tensors = [_as_tensor(v) for v in values]
        if all(t is not None for t in tensors) and len({tuple(t.shape) for t in tensors}) == 1:
            return torch.stack(tensors)
        if column not in self._warned:
            self._warned.add(column)
            warnings.warn(f"CRAFTCollator drops column {column!r}: its values are neither text nor numbers of one "
                          "shape across the batch", stacklevel=3)
        return None
