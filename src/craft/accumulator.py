"""Exact alpha weighting across one gradient-accumulation window.

One optimizer step accumulates the gradients of the window's micro-batches b = 1..G (G = gradient accumulation
steps; on W data-parallel ranks, W windows are averaged by the all-reduce). The step must follow the gradient of

    J = alpha * L_sft + (1 - alpha) * L_con

    L_sft = (sum over every SFT target token t of the window, on every rank, of nll_t) / N_sft
    L_con = (sum over every contrastive term c of the window, on every rank, of InfoNCE_c) / M_con

where N_sft counts SFT target tokens (labels != -100 after the causal shift) and M_con counts contrastive terms
(one per contrastive micro-batch; with self-align, one per SFT micro-batch, whose single forward also gives the
InfoNCE term). A term whose count is zero is absent from J (its weight is not moved to the other term: alpha
keeps meaning the share of the gradient over the steps where both appear).

Because the gradient is linear, scaling each micro-batch's own loss makes the sum of its backward() calls the
gradient of J. A micro-batch with SFT token-sum S_b (sum of its nll_t, not a mean) and InfoNCE value C_b gets

    loss_b = (alpha * W / N_sft) * S_b + ((1 - alpha) * W / M_con) * C_b

The factor W undoes the 1/W of the data-parallel gradient average. `AccumulationScaler` holds these two weights;
`count_window` produces N_sft and M_con from the window's batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

BATCH_TYPE_KEY = "craft_batch_type"
SFT = "sft"
CONTRASTIVE = "contrastive"


@dataclass(frozen=True)
class WindowCounts:
    """What one accumulation window holds: `sft_tokens` (N_sft) and `contrastive_terms` (M_con)."""

    sft_tokens: int = 0
    contrastive_terms: int = 0

    def __add__(self, other: WindowCounts) -> WindowCounts:
        return WindowCounts(self.sft_tokens + other.sft_tokens, self.contrastive_terms + other.contrastive_terms)


@dataclass(frozen=True)
class AccumulationScaler:
    """Per-micro-batch loss weights that make a window's summed gradients equal grad J (module docstring).

    Args:
        alpha: weight of L_sft in J, in [0, 1].
        counts: the window's global counts (summed over ranks).
        world_size: W, the number of ranks whose gradients are averaged.

    Example (one rank, 10 SFT tokens, 2 contrastive micro-batches, alpha 0.6):
        >>> scaler = AccumulationScaler(0.6, WindowCounts(sft_tokens=10, contrastive_terms=2))
        >>> scaler.sft_token_weight, scaler.contrastive_term_weight
        (0.06, 0.2)
    """

    alpha: float
    counts: WindowCounts
    world_size: int = 1

    @property
    def sft_token_weight(self) -> float:
        """alpha * W / N_sft: the weight on a micro-batch's summed token NLL (0 when the window has no SFT token)."""
        if self.counts.sft_tokens == 0:
            return 0.0
        return self.alpha * self.world_size / self.counts.sft_tokens

    @property
    def contrastive_term_weight(self) -> float:
        """(1 - alpha) * W / M_con: the weight on one InfoNCE term (0 when the window has none)."""
        if self.counts.contrastive_terms == 0:
            return 0.0
        return (1.0 - self.alpha) * self.world_size / self.counts.contrastive_terms

    def micro_batch_loss(self, sft_token_sum: torch.Tensor | None = None,
                         contrastive_loss: torch.Tensor | None = None) -> torch.Tensor:
        """loss_b = w_sft * S_b + w_con * C_b for the parts this micro-batch has (at least one must be given)."""
        parts = []
        if sft_token_sum is not None:
            parts.append(self.sft_token_weight * sft_token_sum)
        if contrastive_loss is not None:
            parts.append(self.contrastive_term_weight * contrastive_loss)
        if not parts:
            raise ValueError("micro_batch_loss needs an SFT token sum, a contrastive loss, or both")
        return parts[0] if len(parts) == 1 else parts[0] + parts[1]


def sft_target_count(batch: Mapping, labels_are_shifted_by_model: bool = True) -> int:
    """Number of tokens the causal-LM loss is computed on: `labels[:, 1:] != -100`.

    A pre-shifted `shift_labels` entry (padding-free collators) is counted as is; `labels_are_shifted_by_model=False`
    counts `labels` unshifted (models whose loss does not shift).
    """
    if "shift_labels" in batch:
        targets = batch["shift_labels"]
    elif labels_are_shifted_by_model:
        targets = batch["labels"][..., 1:]
    else:
        targets = batch["labels"]
    return int(targets.ne(-100).sum())


def batch_type(batch: Mapping) -> str:
    """The micro-batch's kind, "sft" or "contrastive" (untagged batches are SFT)."""
    return batch.get(BATCH_TYPE_KEY, SFT)


def count_window(batches: Iterable[Mapping], self_align: bool, labels_are_shifted_by_model: bool = True) -> WindowCounts:
    """N_sft and M_con of one rank's window.

    Each contrastive micro-batch is one InfoNCE term; with `self_align`, each SFT micro-batch is one too (its
    forward gives both losses), and its tokens count once for N_sft.
    """
    total = WindowCounts()
    for batch in batches:
        if batch_type(batch) == CONTRASTIVE:
            total += WindowCounts(contrastive_terms=1)
        else:
            total += WindowCounts(sft_target_count(batch, labels_are_shifted_by_model), int(self_align))
    return total
