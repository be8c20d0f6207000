"""CRAFT data: dataset validation, the padding collator and the SFT / contrastive micro-batch scheduler.

* `make_craft_datasets` checks that the datasets carry the columns the chosen strategy needs and returns a
  `CRAFTDatasetBundle`.
* `CRAFTCollator` pads the anchor columns (``input_ids``, ``attention_mask``, ``labels``, the assistant mask,
  ``control_classes``) and the positive columns (``*_tgt``), each group to its own length.
* `CRAFTMixedDataLoader` interleaves micro-batches of an SFT loader and a contrastive loader: global micro-batch
  ``k`` (0-based, counted from the start of the pass) is contrastive iff ``floor((k+1)·β) > floor(k·β)``, so
  exactly a β fraction of any prefix is contrastive, spread evenly.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Iterator

import torch
from torch import Tensor

from craft.errors import UserError
from craft.packing import collate_padding_free

STRATEGIES = ("paired_dataset", "self_align")
LENGTH_STRATEGIES = ("oversample", "cap", "auto_beta", "error")
BETA_MODES = ("fixed", "auto")
SFT = "sft"
CONTRASTIVE = "craft"  # contrastive-ft 0.4.3's tag, which code written for it compares against
BATCH_TYPE_KEY = "craft_batch_type"
# craft_contrastive_keys: canonical key -> the column that holds it (contrastive-ft 0.4.3's defaults).
CONTRASTIVE_KEYS = {
    "anchor_input_ids": "input_ids",
    "anchor_attention_mask": "attention_mask",
    "anchor_labels": "labels",
    "positive_input_ids": "input_ids_tgt",
    "positive_attention_mask": "attention_mask_tgt",
}


# --------------------------------------------------------------------------------------------------------------
# Datasets


@dataclass
class CRAFTDatasetBundle:
    """The validated datasets of a CRAFT run.

    ``sft_dataset`` feeds the SFT loss. ``contrastive_dataset`` feeds the contrastive micro-batches: the paired
    dataset (``input_ids`` anchors, ``input_ids_tgt`` positives) for ``paired_dataset``; for ``self_align`` the
    dataset whose assistant spans give the positives (the primary dataset unless another was given).
    """

    sft_dataset: Any
    contrastive_dataset: Any
    strategy: str
    assistant_mask_key: str = "assistant_mask"


def _columns(dataset: Any, what: str) -> tuple[set[str], dict[str, int]]:
    """(columns every row has, {column some rows lack: first row lacking it}); a `UserError` for unusable input."""
    if dataset is None:
        raise UserError(f"the {what} is missing")
    if isinstance(dataset, Mapping):
        raise UserError(f"the {what} is a {type(dataset).__name__}; pass a datasets.Dataset or a list of dicts "
                        "(for a DatasetDict, pick one split, e.g. dataset['train'])")
    names = getattr(dataset, "column_names", None)
    if names is not None:
        if isinstance(names, Mapping):
            raise UserError(f"the {what} has several splits ({', '.join(names)}); pass one split")
        if hasattr(dataset, "__len__") and len(dataset) == 0:
            raise UserError(f"the {what} is empty")
        return set(names), {}
    if isinstance(dataset, Sequence) and not isinstance(dataset, (str, bytes)):
        rows = dataset
    elif hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
        rows = [dataset[0]] if len(dataset) else []
    elif hasattr(dataset, "__iter__"):  # an iterable dataset: look at its first example
        rows = [next(iter(dataset), None)]
        rows = [] if rows[0] is None else rows
    else:
        raise UserError(f"the {what} is a {type(dataset).__name__}; pass a datasets.Dataset or a list of dicts")
    if len(rows) == 0:
        raise UserError(f"the {what} is empty")
    common: set[str] | None = None
    first_missing: dict[str, int] = {}
    seen: set[str] = set()
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise UserError(f"row {i} of the {what} is a {type(row).__name__}, not a dict of columns")
        keys = set(row)
        for key in seen - keys:
            first_missing.setdefault(key, i)
        for key in keys - seen:
            if i > 0:
                first_missing.setdefault(key, 0)
        seen |= keys
        common = keys if common is None else common & keys
    return common or set(), first_missing


def _require(dataset: Any, what: str, columns: Sequence[str], why: str) -> None:
    present, first_missing = _columns(dataset, what)
    for column in columns:
        if column in present:
            continue
        if column in first_missing:
            raise UserError(f"row {first_missing[column]} of the {what} has no {column!r} column ({why})")
        found = ", ".join(sorted(present)) or "none"
        raise UserError(f"the {what} has no {column!r} column ({why}); its columns: {found}")


def _require_any(dataset: Any, what: str, columns: Sequence[str], why: str) -> None:
    present, first_missing = _columns(dataset, what)
    if any(column in present for column in columns):
        return
    options = " or ".join(repr(c) for c in columns)
    partial = [c for c in columns if c in first_missing]
    if partial:
        raise UserError(f"row {first_missing[partial[0]]} of the {what} has neither {options} ({why})")
    found = ", ".join(sorted(present)) or "none"
    raise UserError(f"the {what} needs a {options} column ({why}); its columns: {found}")


def canonical_columns(row: Mapping[str, Any], contrastive_keys: Mapping[str, str] | None) -> dict[str, Any]:
    """``row`` with the columns named in ``contrastive_keys`` (``craft_contrastive_keys``: canonical key ->
    column) renamed to the canonical columns (``input_ids``, ``attention_mask``, ``labels``, ``input_ids_tgt``,
    ``attention_mask_tgt``). A row already in canonical names is returned as a plain copy."""
    from craft.config import CONTRASTIVE_KEYS

    renames = {column: CONTRASTIVE_KEYS[key] for key, column in (contrastive_keys or {}).items()
               if column != CONTRASTIVE_KEYS[key] and column in row}
    return {renames.get(name, name): value for name, value in row.items()}


def assistant_mask_columns(assistant_mask_key: str) -> tuple[str, ...]:
    """The columns read as the assistant mask: the configured key, and with the default key also TRL's
    ``assistant_masks`` (what ``apply_chat_template(..., return_assistant_tokens_mask=True)`` returns, and
    contrastive-ft 0.4.3's default key)."""
    return (assistant_mask_key, "assistant_masks") if assistant_mask_key == "assistant_mask" else (assistant_mask_key,)


def make_craft_datasets(primary_dataset: Any, contrastive_dataset: Any = None, strategy: str = "paired_dataset", *,
                        assistant_mask_key: str = "assistant_mask",
                        contrastive_keys: Mapping[str, str] | None = None) -> CRAFTDatasetBundle:
    """Validate the datasets for `strategy` and bundle them.

    * ``paired_dataset``: ``contrastive_dataset`` is required and needs ``input_ids`` (anchors) and
      ``input_ids_tgt`` (positives); ``attention_mask`` / ``attention_mask_tgt`` are optional (the collator builds
      them). The primary dataset is the SFT data and is passed through as is.
    * ``self_align``: the primary dataset needs ``labels`` or the ``assistant_mask_key`` column — the assistant
      span (``labels != -100`` or mask == 1) gives the positive view. The contrastive micro-batches are drawn from
      ``contrastive_dataset`` if given (it must satisfy the same rule) and from the primary dataset otherwise.

    Datasets may be ``datasets.Dataset`` objects or lists of dicts. Every problem is a `UserError` naming the
    dataset and the column. ``contrastive_keys`` (the config's ``craft_contrastive_keys``) names other columns
    for the paired anchors and positives.
    """
    if strategy not in STRATEGIES:
        raise UserError(f"unknown CRAFT strategy {strategy!r}; valid strategies: {', '.join(STRATEGIES)}")
    _columns(primary_dataset, "primary (SFT) dataset")
    if strategy == "paired_dataset":
        if contrastive_dataset is None:
            raise UserError("strategy 'paired_dataset' needs a contrastive_dataset with 'input_ids' (anchor) and "
                            "'input_ids_tgt' (positive) columns; pass contrastive_dataset=... or use "
                            "strategy='self_align'")
        keys = contrastive_keys or {}
        anchors, positives = keys.get("anchor_input_ids", "input_ids"), keys.get("positive_input_ids", "input_ids_tgt")
        _require(contrastive_dataset, "contrastive dataset", (anchors, positives),
                 f"paired_dataset needs anchor {anchors} and positive {positives} (craft_contrastive_keys)")
        return CRAFTDatasetBundle(primary_dataset, contrastive_dataset, strategy, assistant_mask_key)
    why = (f"self_align takes its positives from the assistant span: labels != -100 or {assistant_mask_key} == 1")
    _require_any(primary_dataset, "primary (SFT) dataset", ("labels", *assistant_mask_columns(assistant_mask_key)), why)
    if contrastive_dataset is None:
        contrastive_dataset = primary_dataset
    elif contrastive_dataset is not primary_dataset:
        columns = ("labels", *assistant_mask_columns(assistant_mask_key))
        _require_any(contrastive_dataset, "contrastive dataset", columns, why)
    return CRAFTDatasetBundle(primary_dataset, contrastive_dataset, strategy, assistant_mask_key)


def assistant_token_mask(batch: Mapping[str, Tensor], assistant_mask_key: str = "assistant_mask",
                         strategy: str = "auto") -> Tensor:
    """The [B, T] 0/1 mask of assistant tokens of a collated batch, for self-align pooling.

    ``strategy`` is ``craft_assistant_mask_strategy``: "auto" takes the ``assistant_mask_key`` column (see
    `assistant_mask_columns`) when present,
    else ``labels != -100``; "provided" requires the column. Combined with ``attention_mask``. Missing columns,
    or a row without any assistant token, is a `UserError` naming the rows.
    """
    column = next((c for c in assistant_mask_columns(assistant_mask_key) if c in batch), None)
    if column is not None:
        mask = batch[column] != 0
    elif strategy == "provided":
        raise UserError(f"craft_assistant_mask_strategy='provided' needs the {assistant_mask_key!r} column "
                        "(craft_assistant_mask_key) in every self-align batch; the batch has: "
                        f"{', '.join(sorted(batch))}")
    elif "labels" in batch:
        mask = batch["labels"] != -100
    else:
        raise UserError(f"self_align needs {assistant_mask_key!r} or 'labels' in every batch to find the assistant "
                        f"span; the batch has: {', '.join(sorted(batch))}")
    if "attention_mask" in batch:
        mask = mask & (batch["attention_mask"] != 0)
    empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise UserError(f"self_align: row{'s' if len(empty) > 1 else ''} {', '.join(map(str, empty))} of the batch "
                        f"{'have' if len(empty) > 1 else 'has'} no assistant token (no labels != -100 and no "
                        f"{assistant_mask_key} == 1)")
    return mask.long()


# --------------------------------------------------------------------------------------------------------------
# Collator


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


# --------------------------------------------------------------------------------------------------------------
# Mixed loader


def _as_fraction(beta: Any) -> Fraction:
    if isinstance(beta, Fraction):
        value = beta
    else:
        try:
            value = Fraction(str(float(beta)))  # exact decimal: 0.29 -> 29/100, no float floor surprises
        except (TypeError, ValueError):
            raise UserError(f"craft_beta must be a number in [0, 1]; got {beta!r}") from None
    if not 0 <= value <= 1:
        raise UserError(f"craft_beta must be in [0, 1]; got {float(value)}")
    return value


def is_contrastive_step(k: int, beta: float | Fraction) -> bool:
    """Whether global micro-batch ``k`` (0-based) is contrastive for the SFT fraction ``beta``:
    ``floor((k+1)·γ) > floor(k·γ)`` with ``γ = 1 - beta``."""
    frac = 1 - _as_fraction(beta)
    p, q = frac.numerator, frac.denominator
    return ((k + 1) * p) // q > (k * p) // q


def contrastive_count(k: int, beta: float | Fraction) -> int:
    """How many of micro-batches ``0..k-1`` are contrastive: ``floor(k·γ)`` with ``γ = 1 - beta`` (the schedule's
    prefix property)."""
    frac = 1 - _as_fraction(beta)
    return (int(k) * frac.numerator) // frac.denominator


def _loader_len(loader: Any, name: str) -> int:
    try:
        return len(loader)
    except TypeError:
        raise UserError(f"the {name} loader has no length (an iterable dataset?); CRAFTMixedDataLoader needs "
                        "loaders whose len() is the number of batches per pass") from None


def _batch_count(loader: Any, given: int | None, name: str) -> int:
    """Batches per pass of ``loader``: ``given`` when set, else ``len(loader)`` (0 without a loader)."""
    if given is not None:
        if int(given) < 0:
            raise UserError(f"total {name} batches must be >= 0; got {given}")
        return int(given)
    return 0 if loader is None else _loader_len(loader, name)


class CRAFTMixedDataLoader:
    """Interleave SFT and contrastive micro-batches; each yielded batch is a dict with the extra key
    ``"craft_batch_type"`` (``"sft"`` or ``"craft"``, contrastive-ft's tag for contrastive batches).

    ``beta`` is the fraction of micro-batches drawn from the SFT loader (contrastive-ft 0.4.3's meaning; default
    0.6); ``γ = 1 - beta`` is the contrastive fraction. Micro-batch ``k`` of a pass is contrastive iff
    ``floor((k+1)·γ) > floor(k·γ)``: any prefix of ``K`` batches holds ``floor(K·γ)`` contrastive ones, spread
    evenly, across accumulation windows too. beta = 1 gives only SFT, beta = 0 only contrastive; with
    0 < beta < 1 and one micro-batch per step the two objectives alternate. Without a contrastive loader every
    micro-batch is SFT.

    ``length_strategy``:
      * ``oversample`` (default) — restart the loader that runs out until both have been fully consumed at least
        once; no SFT batch is skipped.
      * ``cap`` — stop at the first batch whose loader would need a restart.
      * ``auto_beta`` — beta = n_sft / (n_sft + n_con) from the loaders' lengths, then cap: both end together.
      * ``error`` — a `UserError` when cap and oversample would give different passes.
    ``beta_mode="auto"`` takes beta = n_sft / (n_sft + n_con) as ``auto_beta`` does, with the length strategy
    given. ``total_sft_batches`` / ``total_craft_batches`` (contrastive-ft's names) give the loaders' batch counts
    per pass when they differ from ``len()`` or the loaders have none. ``beta`` holds the beta in use. ``len()``
    is exactly the number of micro-batches one pass yields; ``schedule()`` lists their types. The SFT loader may
    be None only if beta = 0.
    """

    def __init__(self, sft_loader: Any, contrastive_loader: Any = None, *, beta: float = 0.6,
                 gradient_accumulation_steps: int = 1, beta_mode: str = "fixed", length_strategy: str = "oversample",
                 total_sft_batches: int | None = None, total_craft_batches: int | None = None):
        if length_strategy not in LENGTH_STRATEGIES:
            raise UserError(f"unknown craft_length_strategy {length_strategy!r}; valid: {', '.join(LENGTH_STRATEGIES)}")
        if beta_mode not in BETA_MODES:
            raise UserError(f"unknown craft_beta_mode {beta_mode!r}; valid: {', '.join(BETA_MODES)}")
        if int(gradient_accumulation_steps) < 1:
            raise UserError(f"gradient_accumulation_steps must be >= 1; got {gradient_accumulation_steps}")
        self.sft_loader = sft_loader
        self.contrastive_loader = contrastive_loader
        self.gradient_accumulation_steps = int(gradient_accumulation_steps)
        self.length_strategy = length_strategy
        self.beta_mode = beta_mode
        self.epoch = 0
        self.num_sft_batches = _batch_count(sft_loader, total_sft_batches, "SFT")
        self.num_contrastive_batches = _batch_count(contrastive_loader, total_craft_batches, "contrastive")
        n_sft, n_con = self.num_sft_batches, self.num_contrastive_batches

        if contrastive_loader is None:
            self._beta = Fraction(0)  # nothing to mix in: SFT only
        elif beta_mode == "auto" or length_strategy == "auto_beta":
            if n_sft + n_con == 0 or sft_loader is None:
                raise UserError("an automatic beta (craft_beta_mode='auto' or craft_length_strategy='auto_beta') "
                                "needs both an SFT and a contrastive loader with batches")
            self._beta = Fraction(n_con, n_con + n_sft)
        else:
            self._beta = 1 - _as_fraction(beta)
        # `_beta` is the contrastive fraction γ of the schedule; `beta` the SFT fraction users set.
        self.beta = float(1 - self._beta)
        if self._beta > 0 and n_con == 0:
            raise UserError(f"craft_beta={self.beta:g} schedules contrastive micro-batches but the contrastive "
                            "loader is empty")
        if self._beta < 1 and n_sft == 0:
            raise UserError(f"craft_beta={self.beta:g} schedules SFT micro-batches but the SFT loader is missing or "
                            "empty")

        if length_strategy == "error":
            capped, oversampled = self._plan("cap"), self._plan("oversample")
            if len(capped) != len(oversampled):
                raise UserError(
                    f"craft_length_strategy='error': the loaders do not match the beta schedule ({n_sft} SFT and "
                    f"{n_con} contrastive batches at craft_beta={self.beta:g}: a capped pass has {len(capped)} "
                    f"micro-batches, an oversampled one {len(oversampled)}); matching lengths need beta = "
                    f"{n_sft}/{n_con + n_sft}, or use 'oversample', 'cap' or 'auto_beta'")
            self._schedule = oversampled
        else:
            self._schedule = self._plan("cap" if length_strategy in ("cap", "auto_beta") else "oversample")

    def _plan(self, rule: str) -> list[str]:
        p, q = self._beta.numerator, self._beta.denominator
        need = {SFT: self.num_sft_batches if p < q else 0, CONTRASTIVE: self.num_contrastive_batches if p > 0 else 0}
        available = {SFT: self.num_sft_batches, CONTRASTIVE: self.num_contrastive_batches}
        used = {SFT: 0, CONTRASTIVE: 0}
        plan: list[str] = []
        k = 0
        while True:
            if rule == "oversample" and used[SFT] >= need[SFT] and used[CONTRASTIVE] >= need[CONTRASTIVE]:
                return plan
            kind = CONTRASTIVE if ((k + 1) * p) // q > (k * p) // q else SFT
            if rule == "cap" and used[kind] >= available[kind]:
                return plan
            plan.append(kind)
            used[kind] += 1
            k += 1

    def schedule(self) -> list[str]:
        """The batch types (``"sft"`` / ``"craft"``) of one pass, in order."""
        return list(self._schedule)

    def windows(self) -> list[tuple[int, int]]:
        """``(num_sft, num_contrastive)`` for each accumulation window of one pass (the last may be partial)."""
        ga = self.gradient_accumulation_steps
        out = []
        for start in range(0, len(self._schedule), ga):
            chunk = self._schedule[start:start + ga]
            n_con = chunk.count(CONTRASTIVE)
            out.append((len(chunk) - n_con, n_con))
        return out

    def __len__(self) -> int:
        return len(self._schedule)

    @property
    def batch_size(self) -> int | None:
        loader = self.sft_loader if self.sft_loader is not None else self.contrastive_loader
        return getattr(loader, "batch_size", None)

    def passes_per_epoch(self) -> dict[str, int]:
        """How many passes one epoch takes of each loader (the schedule fixes it): ``{"sft": P, "craft": P}``."""
        sizes = {SFT: self.num_sft_batches, CONTRASTIVE: self.num_contrastive_batches}
        return {kind: -(-self._schedule.count(kind) // sizes[kind]) if sizes[kind] else 0 for kind in sizes}

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next ``__iter__`` yields: loader pass ``r`` of epoch ``e`` is shuffled as pass
        ``e · P + r`` (``P`` = `passes_per_epoch`), forwarded to the loaders' samplers that have ``set_epoch``.

        Why passes are numbered: a shuffling `DataLoader` draws each pass's order from a generator whose state
        advances with every pass, so a run resumed in epoch 3 (fresh generator) would replay epoch 1's order."""
        self.epoch = int(epoch)
        passes = self.passes_per_epoch()
        for kind, loader in ((SFT, self.sft_loader), (CONTRASTIVE, self.contrastive_loader)):
            if loader is not None:
                set_loader_epoch(loader, self.epoch * passes[kind])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        loaders = {SFT: self.sft_loader, CONTRASTIVE: self.contrastive_loader}
        passes = self.passes_per_epoch()
        started = {SFT: 0, CONTRASTIVE: 0}
        iterators: dict[str, Iterator | None] = {SFT: None, CONTRASTIVE: None}

        def start(kind: str) -> Iterator:
            set_loader_epoch(loaders[kind], self.epoch * passes[kind] + started[kind])
            started[kind] += 1
            return iter(loaders[kind])

        for kind in self._schedule:
            if iterators[kind] is None:
                iterators[kind] = start(kind)
            try:
                batch = next(iterators[kind])
            except StopIteration:
                iterators[kind] = start(kind)  # oversampling: the next pass of this loader
                try:
                    batch = next(iterators[kind])
                except StopIteration:
                    raise RuntimeError(f"the {kind} loader yielded no batch after a restart") from None
            if not isinstance(batch, Mapping):
                raise UserError(f"CRAFTMixedDataLoader needs loaders that yield dicts; the {kind} loader yielded "
                                f"a {type(batch).__name__}")
            batch = dict(batch)
            batch[BATCH_TYPE_KEY] = kind
            if kind == CONTRASTIVE and "labels" not in batch and isinstance(batch.get("input_ids"), Tensor):
                # No SFT target in a contrastive micro-batch; transformers' Trainer counts `labels` in every
                # micro-batch of a window once the first has them, so they are stated: all -100.
                batch["labels"] = torch.full_like(batch["input_ids"], -100)
            yield batch


def set_loader_epoch(loader: Any, epoch: int) -> None:
    """Forward ``epoch`` to the first of ``loader``, its sampler, its batch sampler and the batch sampler's sampler
    that has ``set_epoch`` (a `DistributedSampler`, accelerate's loaders); loaders without one are left alone."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    for target in (loader, getattr(loader, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None)):
        if target is not None and callable(getattr(target, "set_epoch", None)):
            target.set_epoch(int(epoch))
            return


class ContrastiveStream:
    """An endless stream of a loader's batches, pass after pass, whose position is the number of batches drawn.

    Pass ``p`` is shuffled as sampler epoch ``p`` (`set_loader_epoch`), so `seek(n)` puts a fresh stream exactly
    where one that had drawn ``n`` batches stands: pass ``n // len(loader)``, after ``n % len(loader)`` batches.
    """

    def __init__(self, loader: Any):
        self.loader = loader
        self.length = _loader_len(loader, "contrastive")
        if self.length == 0:
            raise UserError("the contrastive loader is empty: it yields no batch")
        self.position = 0
        self._iterator: Iterator | None = None

    def seek(self, position: int) -> None:
        """Continue as a stream that has already yielded ``position`` batches."""
        self.position = int(position)
        self._iterator = None

    def __iter__(self):
        return self

    def __next__(self):
        offset = self.position % self.length
        if self._iterator is None or offset == 0:
            set_loader_epoch(self.loader, self.position // self.length)
            self._iterator = iter(self.loader)
            for _ in range(offset):  # resumed mid-pass: skip what the interrupted run drew
                next(self._iterator)
        batch = next(self._iterator)
        self.position += 1
        return batch


def build_loader(dataset: Any, batch_size: int, collator: Any, shuffle: bool, seed: int, drop_last: bool = False, *,
                 num_replicas: int | None = None, rank: int | None = None, num_workers: int = 0):
    """A `torch.utils.data.DataLoader` over `dataset` (a datasets.Dataset or a list of dicts).

    Shuffling is seeded: pass ``p`` (the sampler's ``set_epoch(p)``) is the permutation of (``seed``, ``p``), the
    same in any run; iterating never touches the global torch RNG. With ``num_replicas > 1`` the data is sharded
    by the same `DistributedSampler` (``rank`` of ``num_replicas``). Without shuffling and sharding the loader reads
    the rows in order.
    """
    from torch.utils.data import DataLoader, DistributedSampler

    if int(batch_size) < 1:
        raise UserError(f"batch size must be >= 1; got {batch_size}")
    replicas = 1 if num_replicas is None else max(int(num_replicas), 1)
    # Its own generator: a DataLoader without one draws a seed from the global torch RNG at every iter(), which
    # would shift the dropout randomness of a resumed run (its loaders restart at other moments).
    generator = torch.Generator().manual_seed(int(seed))
    if replicas == 1 and not shuffle:
        return DataLoader(dataset, batch_size=int(batch_size), shuffle=False, collate_fn=collator,
                          drop_last=drop_last, num_workers=num_workers, generator=generator)
    # One replica too: DistributedSampler's order is a function of (seed, epoch) alone, which resume needs.
    sampler = DistributedSampler(dataset, num_replicas=replicas, rank=rank or 0, shuffle=shuffle, seed=int(seed),
                                 drop_last=drop_last)
    return DataLoader(dataset, batch_size=int(batch_size), sampler=sampler, collate_fn=collator, drop_last=drop_last,
                      num_workers=num_workers, generator=generator)
