"""Pre-tokenised preference rows for TRL's ORPO trainer (contrastive-ft 0.4.3's notebook 03c).

TRL's `ORPOTrainer` takes text rows (``prompt`` / ``chosen`` / ``rejected``) and tokenises them itself; a dataset
that is already token ids fails inside TRL with ``KeyError: 'prompt'``. `CRAFTORPOTrainer` accepts such rows:
a row with ``prompt_input_ids``, ``chosen_input_ids`` and ``rejected_input_ids`` (lists of ids) and no ``prompt``
is completed into the row TRL's own tokenisation would produce, without decoding and re-encoding anything:

* ``chosen_input_ids`` / ``rejected_input_ids`` may be the whole sequence (starting with the prompt ids) or only
  the response; a response gets the prompt ids prepended.
* missing ``*_attention_mask`` columns are ones; missing ``chosen_labels`` / ``rejected_labels`` are the
  sequence with the prompt positions set to -100 (the loss covers the response only, as TRL's labels do).
* sequences longer than the trainer's ``max_length`` keep their first ``max_length`` tokens (prompt first).

Text rows go through TRL's tokenisation unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from craft.errors import UserError

TOKEN_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")


def is_pretokenised_preference_row(row: Mapping[str, Any]) -> bool:
    """A row of token ids (`TOKEN_COLUMNS`) without the text ``prompt`` TRL would tokenise."""
    return "prompt" not in row and all(column in row for column in TOKEN_COLUMNS)


def complete_preference_row(row: Mapping[str, Any], max_length: int | None = None) -> dict[str, list[int]]:
    """The ORPO row TRL's ``tokenize_row`` would build, from a pre-tokenised row (module docstring)."""
    prompt = [int(t) for t in row["prompt_input_ids"]]
    if not prompt:
        raise UserError("a pre-tokenised preference row has an empty prompt_input_ids")
    out = {"prompt_input_ids": prompt,
           "prompt_attention_mask": list(row.get("prompt_attention_mask") or [1] * len(prompt))}
    for side in ("chosen", "rejected"):
        ids = [int(t) for t in row[f"{side}_input_ids"]]
        if ids[:len(prompt)] != prompt:  # the response alone
            ids = prompt + ids
        labels = row.get(f"{side}_labels")
        labels = list(labels) if labels is not None else [-100] * len(prompt) + ids[len(prompt):]
        mask = list(row.get(f"{side}_attention_mask") or [1] * len(ids))
        if not len(labels) == len(mask) == len(ids):
            raise UserError(f"a pre-tokenised preference row has {side}_labels / {side}_attention_mask of another "
                            f"length than its {side}_input_ids ({len(labels)}, {len(mask)} vs {len(ids)})")
        if max_length is not None:
            ids, labels, mask = ids[:max_length], labels[:max_length], mask[:max_length]
        out.update({f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": labels})
    return out


class PreTokenisedPreferenceRows:
    """Mixin for a TRL preference trainer whose ``tokenize_row`` TRL maps over the dataset: pre-tokenised rows
    are completed by `complete_preference_row`, text rows go to the host's ``tokenize_row``."""

    def tokenize_row(self, feature, model=None):
        if is_pretokenised_preference_row(feature):
            return complete_preference_row(feature, getattr(self, "max_length", None))
        return super().tokenize_row(feature, model)
