"""From a CRAFT batch to last hidden states: the capture, the forward of the (wrapped) model, the pooled spans.

`forward_hidden` runs one forward of the model the trainer wraps (DDP, DeepSpeed or FSDP engine included, so its
gradients are synchronised and sharded parameters are gathered) and returns the last hidden state [B, T, H],
captured by a hook on the final norm (`craft.hooks`) or read from ``output_hidden_states``. Only the last
position's logits are computed.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from craft.accumulator import CONTRASTIVE
from craft.data import assistant_token_mask
from craft.errors import UserError
from craft.hooks import LastHiddenStateCapture, unwrap_model
from craft.packing import packed_segments


class BackboneHiddenStates:
    """Last hidden state [B, T, H] via `output_hidden_states=True` (craft_use_hidden_state_hook=False).

    The model is asked for every layer's output (`forward_kwargs`); the last one is read from the backbone's
    output by a forward hook, because TRL's fused LM head does not return the hidden states to the caller.
    """

    forward_kwargs = {"output_hidden_states": True}

    def __init__(self, model: nn.Module):
        self.backbone = unwrap_model(model).base_model
        self.hidden = None
        self._handle = None

    def _hook(self, module, inputs, output):
        self.hidden = output.hidden_states[-1]

    def __enter__(self):
        self._handle = self.backbone.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc_info):
        self._handle.remove()


class FinalNormHook(LastHiddenStateCapture):
    """`LastHiddenStateCapture` with the (empty) extra forward arguments the capture protocol asks for."""

    forward_kwargs: dict = {}


@contextlib.contextmanager
def hidden_state_capture(model: nn.Module, use_hook: bool):
    """Capture of the last hidden state around a forward of ``model``: ``.hidden``, ``.forward_kwargs``."""
    capture = FinalNormHook(unwrap_model(model)) if use_hook else BackboneHiddenStates(model)
    with capture:
        yield capture


def forward_hidden(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None,
                   use_hook: bool = True) -> tuple[Tensor, Tensor]:
    """(last hidden state [B, T, H], a zero tied to the logits) of one forward of ``model``.

    Adding the zero to the loss gives the LM head a (zero) gradient, as DDP requires of every parameter the
    forward used.
    """
    with hidden_state_capture(model, use_hook) as capture:
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1,
                        **capture.forward_kwargs)
    return capture.hidden, outputs.logits.sum() * 0.0


def ids_and_mask(batch, suffix: str) -> tuple[Tensor, Tensor]:
    """(``input_ids<suffix>``, ``attention_mask<suffix>`` or all ones) of a batch."""
    ids = batch["input_ids" + suffix]
    mask = batch.get("attention_mask" + suffix)
    return ids, torch.ones_like(ids) if mask is None else mask


def stack_right_padded(pairs) -> tuple[Tensor, Tensor]:
    """Concatenate (ids [B_i, T_i], mask [B_i, T_i]) along the batch, right-padding to max T_i (mask 0 there).

    Causal attention and masked pooling make the extra right padding invisible to the real tokens.
    """
    length = max(ids.shape[1] for ids, _ in pairs)
    padded_ids, padded_masks = [], []
    for ids, mask in pairs:
        extra = length - ids.shape[1]
        padded_ids.append(nn.functional.pad(ids, (0, extra), value=0))  # any id: masked
        padded_masks.append(nn.functional.pad(mask, (0, extra), value=0))
    return torch.cat(padded_ids), torch.cat(padded_masks)


def paired_sides(batch) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """(anchors, positives) of a paired contrastive batch, each (ids, mask); a `UserError` without positives."""
    if "input_ids_tgt" not in batch:
        raise UserError("a paired contrastive batch has no 'input_ids_tgt' (the positives); the contrastive "
                        f"loader must yield them (CRAFTCollator pads them); batch keys: {', '.join(batch)}")
    return ids_and_mask(batch, ""), ids_and_mask(batch, "_tgt")


def self_align_masks(batch, assistant_mask_key: str, strategy: str = "auto") -> tuple[Tensor, Tensor]:
    """(prompt mask, assistant mask), each [B, T] (``strategy``: craft_assistant_mask_strategy, see
    `craft.data.assistant_token_mask`); a `UserError` naming rows with an empty span."""
    positive = assistant_token_mask(batch, assistant_mask_key, strategy).bool()
    attention = batch.get("attention_mask")
    attention = torch.ones_like(positive) if attention is None else attention.bool()
    anchor = attention & ~positive
    empty = (~anchor.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise UserError(f"self_align: row(s) {', '.join(map(str, empty))} of the batch have no prompt token "
                        "(every token is an assistant token), so there is no anchor to pool")
    return anchor, positive


def with_default_labels(batch, kind: str):
    """SFT batches without `labels` learn every non-padding token (labels = input_ids, padding -> -100)."""
    if kind == CONTRASTIVE or "labels" in batch:
        return batch
    labels = batch["input_ids"].clone()
    if "attention_mask" in batch:
        labels[batch["attention_mask"] == 0] = -100
    return {**batch, "labels": labels}


def packed_self_align_masks(batch, assistant_mask_key: str, strategy: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """Self-align masks of a packed batch (`craft.packing`): (anchor [S, T], positive [S, T], rows [S]), one pair
    per conversation that has assistant tokens — the prompt and the answer of that conversation only.

    Conversations without an assistant token (padding at the end of a packed row; TRL drops fully masked rows
    before packing) are left out; a conversation without a prompt token is a `UserError`.
    """
    positive = assistant_token_mask(batch, assistant_mask_key, strategy).bool()
    attention = batch.get("attention_mask")
    attention = torch.ones_like(positive) if attention is None else attention.bool()
    rows, (anchor, positive) = packed_segments(batch["position_ids"], attention & ~positive, positive)
    keep = positive.any(dim=1)
    rows, anchor, positive = rows[keep], anchor[keep], positive[keep]
    empty = (~anchor.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise UserError(f"self_align: packed conversation(s) {', '.join(map(str, empty))} of the batch have no "
                        "prompt token (every token is an assistant token), so there is no anchor to pool")
    return anchor, positive, rows
