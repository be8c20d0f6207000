"""Input checks with one clear `UserError` instead of a bare ``TypeError`` deep in a host library, and warnings
for settings that silently train nothing.

Errors (one line naming the key, column or row):
* an unknown ``craft_*`` keyword, to a CRAFT config class (`reject_unknown_craft_keys`) or to a CRAFT trainer
  (`check_craft_keywords`), names the keyword and the closest known one;
* an empty ``train_dataset``; a ``train_dataset`` whose every row has all labels -100 (no SFT target token);
* a ``craft_bundle`` built from other rows than ``train_dataset``;
* text in a token column (``input_ids``, ``attention_mask``, ``labels`` and their ``_tgt`` twins) of
  ``train_dataset`` or the contrastive dataset, and a row of a paired contrastive dataset without its positive
  (``input_ids_tgt`` missing or None): `check_token_columns`.

Warnings (`CRAFTNoOpWarning`, each naming the knob to change), checked once when a trainer is built:
* a contrastive micro-batch of one pair without extra negatives: InfoNCE over one candidate is log 1 = 0, so its
  gradient is 0 (accuracy 1.0 at every step);
* ``craft_pooling="cls"`` on a causal LM: the first token's hidden state sees only itself, so every sequence that
  starts with the same token (BOS) gets the same embedding and the loss stays at ln B;
* ``craft_alpha=1`` while contrastive micro-batches are still scheduled: their weight is 1 - alpha = 0;
* ``craft_alpha<1`` with no contrastive micro-batch scheduled (paired strategy, ``craft_beta=1``: SFT only).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from craft.errors import UserError


class CRAFTNoOpWarning(UserWarning):
    """A CRAFT setting under which (part of) the contrastive objective silently trains nothing."""


def check_craft_keywords(owner: str, given: Iterable[str], known: Iterable[str]) -> None:
    """A `UserError` for the first ``craft_*`` name of ``given`` that is not in ``known``."""
    known = sorted(set(known))
    for name in given:
        if name.startswith("craft_") and name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known craft_* keys: {', '.join(known)}"
            raise UserError(f"{owner}: unknown keyword {name!r}{hint}")


def reject_unknown_craft_keys(cls: type) -> type:
    """Class decorator for a CRAFT config dataclass: an unknown ``craft_*`` keyword is a `UserError` naming it
    (instead of the dataclass's bare ``TypeError``). The known names are the class's fields."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        check_craft_keywords(type(self).__name__, kwargs, [f.name for f in dataclasses.fields(type(self))])
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


# ------------------------------------------------------------------------------------------------ datasets


def _length(dataset: Any) -> int | None:
    try:
        return len(dataset)
    except TypeError:
        return None


def _row(dataset: Any, index: int) -> Mapping | None:
    try:
        row = dataset[index]
    except (IndexError, KeyError, TypeError):
        return None
    return row if isinstance(row, Mapping) else None


def _same_value(a: Any, b: Any) -> bool:
    try:
        return a == b if not hasattr(a, "tolist") else a.tolist() == (b.tolist() if hasattr(b, "tolist") else b)
    except Exception:  # values that do not compare (arrays of other shapes, ...) count as different
        return False


def check_bundle_matches(train_dataset: Any, bundle_dataset: Any) -> None:
    """A `UserError` when the bundle's SFT dataset is not ``train_dataset``: other length, or a different value in
    a shared column of the first, middle or last row. The same object (the usual case) passes at once."""
    if train_dataset is None or bundle_dataset is None or train_dataset is bundle_dataset:
        return
    n_train, n_bundle = _length(train_dataset), _length(bundle_dataset)
    if n_train is None or n_bundle is None:
        return  # iterable datasets: nothing to compare without consuming them
    why = "pass the dataset given to make_craft_datasets as train_dataset (or rebuild the bundle from it)"
    if n_train != n_bundle:
        raise UserError(f"craft_bundle was built from a dataset of {n_bundle} rows but train_dataset has {n_train}; "
                        f"{why}")
    for index in sorted({0, n_train // 2, n_train - 1}) if n_train else ():
        a, b = _row(train_dataset, index), _row(bundle_dataset, index)
        if a is None or b is None:
            return
        for column in sorted(set(a) & set(b)):
            if not _same_value(a[column], b[column]):
                raise UserError(f"craft_bundle was built from other rows than train_dataset (row {index}, column "
                                f"{column!r} differs); {why}")


def _all_masked(labels: Any, ignore_index: int) -> bool:
    values = labels.tolist() if hasattr(labels, "tolist") else labels
    return all(int(v) == ignore_index for v in values)


def check_train_dataset(train_dataset: Any, ignore_index: int = -100) -> None:
    """``train_dataset`` (as the user passed it) must have rows, and at least one SFT target token when it has a
    ``labels`` column."""
    n = _length(train_dataset)
    if n == 0:
        raise UserError("train_dataset is empty: CRAFT needs SFT rows (or host rows for the preference / RL "
                        "trainers) to train on")
    check_token_columns(train_dataset, "train_dataset")
    names = getattr(train_dataset, "column_names", None)
    if n is None or (names is not None and "labels" not in names):
        return
    if names is not None:  # row by row (never the whole column in memory)
        rows = (row["labels"] for row in train_dataset.select_columns(["labels"]))
    elif all(isinstance(row, Mapping) and row.get("labels") is not None for row in train_dataset):
        rows = (row["labels"] for row in train_dataset)
    else:
        return
    for labels in rows:  # stops at the first row with a target token: the usual dataset costs one row
        if not _all_masked(labels, ignore_index):
            break
    else:
        raise UserError(f"train_dataset: every row's 'labels' are {ignore_index} ({n} rows): there is no SFT target "
                        "token to learn; check the assistant / completion mask that built the labels")


TOKEN_COLUMNS = ("input_ids", "attention_mask", "labels", "input_ids_tgt", "attention_mask_tgt", "labels_tgt")


def _is_text(value: Any) -> bool:
    """A string, or a sequence whose first item is one (``["the", "cat"]``)."""
    if isinstance(value, (str, bytes)):
        return True
    if isinstance(value, (list, tuple)) and value:
        return isinstance(value[0], (str, bytes))
    return False


def _arrow_holds_text(arrow_type: Any) -> bool:
    import pyarrow as pa

    while pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type) or pa.types.is_fixed_size_list(arrow_type):
        arrow_type = arrow_type.value_type
    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) or pa.types.is_binary(arrow_type)


def _first_row(values: Iterable[Any], test) -> int | None:
    return next((index for index, value in enumerate(values) if test(value)), None)


def _column_problem(dataset: Any, column: str, required: bool) -> tuple[str, int] | None:
    """("text" | "missing", first row) for one column of a `datasets.Dataset` or a list of dicts, else None.
    A `datasets.Dataset` answers from its Arrow schema and null count; rows are read only to name the bad one."""
    table = getattr(dataset, "data", None)
    if hasattr(dataset, "column_names") and hasattr(table, "schema"):
        if column not in dataset.column_names:
            return None  # an absent column: the dataset's own column checks name it
        rows = (row[column] for row in dataset.select_columns([column]))
        if _arrow_holds_text(table.schema.field(column).type):
            return "text", _first_row(rows, lambda v: v is not None) or 0
        if required and table.column(column).null_count:
            return "missing", _first_row(rows, lambda v: v is None)
        return None
    if not isinstance(dataset, (list, tuple)) or not all(isinstance(row, Mapping) for row in dataset):
        return None  # other datasets (iterable, torch): left to the collator
    if not any(column in row for row in dataset):
        return None
    text = _first_row((row.get(column) for row in dataset), _is_text)
    if text is not None:
        return "text", text
    missing = _first_row((row.get(column) for row in dataset), lambda v: v is None) if required else None
    return None if missing is None else ("missing", missing)


def check_token_columns(dataset: Any, what: str, columns: Iterable[str] = TOKEN_COLUMNS,
                        required: Iterable[str] = ()) -> None:
    """A `UserError` naming the column and the first bad row when a token column of ``dataset`` holds text, or a
    ``required`` column is missing (None) in some row — e.g. the positive ``input_ids_tgt`` of a paired
    contrastive dataset built from rows that lack it (`datasets` fills those with None)."""
    required = set(required)
    for column in dict.fromkeys([*columns, *required]):
        problem = _column_problem(dataset, column, column in required)
        if problem is None:
            continue
        kind, row = problem
        if kind == "text":
            value = dataset[row][column]
            raise UserError(f"row {row} of the {what}: column {column!r} holds text ({str(value)[:40]!r}), not token "
                            "ids; tokenize it first, e.g. tokenizer(texts)['input_ids']")
        raise UserError(f"row {row} of the {what} has no {column!r} (None): every row of a paired contrastive "
                        f"dataset needs its positive; drop the rows without one or fill them")


def check_prepared_dataset(prepared: Any) -> None:
    """The host's prepared copy of ``train_dataset`` (TRL drops fully masked rows) must still have rows."""
    if _length(prepared) == 0:
        raise UserError("train_dataset has no row left after the host trainer's preparation (TRL drops rows whose "
                        "labels are all -100 and rows truncated to nothing); check max_length and the labels")


# ------------------------------------------------------------------------------------------------ no-op warnings


def warn_no_op_settings(args: Any, *, model_is_causal: bool, contrastive_scheduled: bool,
                        contrastive_batch_size: int, negatives_from_other_ranks: bool = False) -> list[str]:
    """Warn (`CRAFTNoOpWarning`) about the settings of the module docstring; returns the messages.

    ``contrastive_scheduled``: whether any micro-batch computes InfoNCE (paired with craft_beta < 1, or
    self-align); ``contrastive_batch_size``: pairs per contrastive micro-batch; ``negatives_from_other_ranks``:
    in-batch negatives are gathered across > 1 data-parallel ranks.
    """
    messages = []
    if contrastive_scheduled and args.craft_alpha < 1:
        extra_negatives = args.craft_negative_strategy == "queue" or negatives_from_other_ranks
        if contrastive_batch_size < 2 and not extra_negatives:
            messages.append(
                f"a contrastive micro-batch holds {contrastive_batch_size} pair and craft_negative_strategy="
                f"{args.craft_negative_strategy!r} adds no negatives: InfoNCE is 0 with accuracy 1.0 at every step "
                "and trains nothing; set craft_contrastive_batch_size (or per_device_train_batch_size) >= 2, or "
                "craft_negative_strategy='queue'")
    if contrastive_scheduled and args.craft_pooling == "cls" and model_is_causal:
        messages.append(
            "craft_pooling='cls' on a causal LM pools the first token, whose hidden state sees no other token: "
            "sequences starting with the same token get the same embedding and the loss stays at ln(batch size); "
            "use craft_pooling='last_token' or 'mean'")
    if contrastive_scheduled and args.craft_alpha == 1:
        messages.append(
            "craft_alpha=1 gives the contrastive loss weight 1 - alpha = 0: it is computed every contrastive "
            "micro-batch but trains nothing; lower craft_alpha, or set craft_beta=1 (SFT only) to skip it")
    if not contrastive_scheduled and args.craft_alpha < 1:
        messages.append(
            f"craft_beta=1 schedules no contrastive micro-batch (it is the SFT share), so craft_alpha="
            f"{args.craft_alpha:g} only scales the SFT loss; lower craft_beta (or use strategy='self_align') to "
            "train the contrastive objective")
    for message in messages:
        warnings.warn(message, CRAFTNoOpWarning, stacklevel=3)
    return messages
