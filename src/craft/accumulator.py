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
CONTRASTIVE = "craft"  # contrastive-ft 0.4.3's tag for contrastive micro-batches
CONTRASTIVE_TAGS = (CONTRASTIVE, "contrastive")  # both mean a contrastive micro-batch


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


def tag_kind(tag: str | None) -> str:
    """The kind a batch tag means: `CONTRASTIVE` for "craft" and "contrastive", else "sft" (None too)."""
    return CONTRASTIVE if tag in CONTRASTIVE_TAGS else SFT


def batch_type(batch: Mapping) -> str:
    """The micro-batch's kind (`tag_kind` of its "craft_batch_type"; untagged batches are SFT)."""
    return tag_kind(batch.get(BATCH_TYPE_KEY))


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


# ------------------------------------------------------------------------------ contrastive-ft 0.4.3 names


@dataclass(frozen=True)
class AccumulationScales:
    """contrastive-ft 0.4.3's per-micro-batch loss scales for a window of ``n_sft`` SFT and ``n_contrastive``
    contrastive micro-batches, each loss a mean: ``sft_scale = alpha / n_sft``, ``contrastive_scale =
    (1 - alpha) / n_contrastive`` (0 for an absent kind). ``effective_alpha`` is the SFT share of the window."""

    sft_scale: float
    contrastive_scale: float
    n_sft: int
    n_contrastive: int
    effective_alpha: float


class CRAFTGradientAccumulator:
    """contrastive-ft 0.4.3's accumulator: `AccumulationScaler` with each micro-batch's mean loss as one unit.

    ``CRAFTGradientAccumulator(alpha, gradient_accumulation_steps, n_sft, n_contrastive)`` (alpha clamped to
    [0, 1]); ``scale_sft_loss(l) = l * alpha / n_sft`` and ``scale_contrastive_loss(l) = l * (1 - alpha) /
    n_contrastive``, so the window's summed gradients are ``alpha * mean(SFT) + (1 - alpha) * mean(InfoNCE)``.
    That weights SFT micro-batches equally whatever their token counts; the CRAFT trainers use
    `AccumulationScaler` over the window's tokens instead (the token-mean NLL, also with TRL's normalisation).
    """

    def __init__(self, alpha: float, gradient_accumulation_steps: int, n_sft: int, n_contrastive: int):
        self.alpha = min(max(float(alpha), 0.0), 1.0)
        self.gradient_accumulation_steps = max(1, int(gradient_accumulation_steps))
        self.update_batch_counts(n_sft, n_contrastive)

    def update_batch_counts(self, n_sft: int, n_contrastive: int) -> None:
        """Set the window's micro-batch counts (e.g. after an automatic beta) and recompute the scales."""
        self.n_sft, self.n_contrastive = max(0, int(n_sft)), max(0, int(n_contrastive))
        self._scaler = AccumulationScaler(self.alpha, WindowCounts(self.n_sft, self.n_contrastive))

    @property
    def scales(self) -> AccumulationScales:
        if self.n_sft + self.n_contrastive == 0:
            return AccumulationScales(1.0, 1.0, 0, 0, self.alpha)
        effective = self.alpha if self.n_sft and self.n_contrastive else float(self.n_sft > 0)
        return AccumulationScales(self._scaler.sft_token_weight, self._scaler.contrastive_term_weight,
                                  self.n_sft, self.n_contrastive, effective)

    def scale_sft_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scales.sft_scale

    def scale_contrastive_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scales.contrastive_scale

    def __repr__(self) -> str:
        scales = self.scales
        return (f"CRAFTGradientAccumulator(alpha={self.alpha}, sft_scale={scales.sft_scale:.3f}, "
                f"con_scale={scales.contrastive_scale:.3f}, n_sft={self.n_sft}, n_con={self.n_contrastive})")


def compute_batch_distribution(beta: float, gradient_accumulation_steps: int) -> tuple[int, int]:
    """contrastive-ft 0.4.3's split of one window: ``(n_sft, n_contrastive)`` with ``n_sft = round(beta * G)``
    (beta = SFT fraction, clamped to [0, 1]), at least one of each kind when 0 < beta < 1.

    `craft.data.CRAFTMixedDataLoader` spreads beta exactly over consecutive windows instead (its ``windows()``
    gives each window's real counts); this is the original's per-window rounding, for code that sizes by it.
    """
    beta = min(max(float(beta), 0.0), 1.0)
    total = max(1, int(gradient_accumulation_steps))
    n_sft = min(total, max(0, round(beta * total)))
    if beta > 0 and n_sft == 0:
        n_sft = 1
    if beta < 1 and n_sft == total:
        n_sft = total - 1
    return n_sft, total - n_sft
