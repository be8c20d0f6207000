"""CRAFT data: the datasets of a run and the assistant span.

* `make_craft_datasets` checks that the datasets carry the columns the chosen strategy needs and returns a
  `CRAFTDatasetBundle`.
* `assistant_token_mask` finds the assistant span of a collated batch (self-align's positive view).

contrastive-ft 0.4.3 exported its collator and scheduler from this module too, so they are importable from here:
`CRAFTCollator` lives in `craft.collator`, `CRAFTMixedDataLoader` and the loaders in `craft.loader`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from craft.accumulator import BATCH_TYPE_KEY, CONTRASTIVE, SFT  # noqa: F401  (contrastive-ft 0.4.3 names)
from craft.collator import CRAFTCollator  # noqa: F401
from craft.errors import UserError
from craft.validation import TOKEN_COLUMNS, check_token_columns
from craft.loader import (BETA_MODES, LENGTH_STRATEGIES, ContrastiveStream, CRAFTMixedDataLoader,  # noqa: F401
                          build_loader, contrastive_count, is_contrastive_step, set_loader_epoch)

STRATEGIES = ("paired_dataset", "self_align")
# craft_contrastive_keys: canonical key -> the column that holds it (contrastive-ft 0.4.3's defaults).
CONTRASTIVE_KEYS = {
    "anchor_input_ids": "input_ids",
    "anchor_attention_mask": "attention_mask",
    "anchor_labels": "labels",
    "positive_input_ids": "input_ids_tgt",
    "positive_attention_mask": "attention_mask_tgt",
}


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
        # every row needs its positive (datasets fills a key some rows lack with None), all of them token ids
        check_token_columns(contrastive_dataset, "contrastive dataset", (*TOKEN_COLUMNS, *keys.values()),
                            required=(positives,))
        return CRAFTDatasetBundle(primary_dataset, contrastive_dataset, strategy, assistant_mask_key)
    why = (f"self_align takes its positives from the assistant span: labels != -100 or {assistant_mask_key} == 1")
    _require_any(primary_dataset, "primary (SFT) dataset", ("labels", *assistant_mask_columns(assistant_mask_key)), why)
    if contrastive_dataset is None:
        contrastive_dataset = primary_dataset
    elif contrastive_dataset is not primary_dataset:
        columns = ("labels", *assistant_mask_columns(assistant_mask_key))
        _require_any(contrastive_dataset, "contrastive dataset", columns, why)
        check_token_columns(contrastive_dataset, "contrastive dataset")
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
