"""Metrics logged during CRAFT training: contrastive accuracy and representation consistency (EMA reference).

`contrastive_accuracy` and `EMAReference` are what the trainers log. `compute_contrastive_accuracy`,
`compute_representation_consistency` and `update_representation_reference` are contrastive-ft 0.4.3's functional
forms of the same metrics, on embeddings rather than logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def contrastive_accuracy(logits: Tensor) -> float:
    """Fraction of anchors whose highest logit is their own positive: ``mean(argmax(logits[i]) == i)``.

    ``logits`` is the [B, B+N] matrix of `InfoNCELoss` (positives on the diagonal of the first B columns).
    """
    if logits.dim() != 2 or logits.shape[0] == 0 or logits.shape[1] < logits.shape[0]:
        raise ValueError(f"contrastive_accuracy expects logits of shape [B, B+N] with B >= 1; got {tuple(logits.shape)}")
    logits = logits.detach()
    target = torch.arange(logits.shape[0], device=logits.device)
    return float((logits.argmax(dim=1) == target).float().mean())


def _mean_direction(emb: Tensor) -> Tensor:
    emb = emb.detach().float()
    if emb.dim() == 1:
        emb = emb.unsqueeze(0)
    if emb.dim() != 2 or emb.shape[0] == 0:
        raise ValueError(f"expected embeddings of shape [batch, dim]; got {tuple(emb.shape)}")
    return F.normalize(emb, dim=-1).mean(dim=0)


def ema_update(reference: Tensor | None, value: Tensor, decay: float) -> Tensor:
    """``decay * reference + (1 - decay) * value`` (``value`` itself when there is no reference yet)."""
    if reference is None:
        return value.clone()
    return decay * reference.to(value.device) + (1.0 - decay) * value


def compute_contrastive_accuracy(anchor: Tensor, positives: Tensor) -> Tensor:
    """Top-1 accuracy of embeddings: ``mean_i(argmax_j(anchor_i · positives_j) == i)`` as a scalar tensor.

    ``anchor`` and ``positives`` are [B, D] (projected, normalised embeddings: the dot product is the cosine).
    """
    return torch.tensor(contrastive_accuracy(anchor.detach() @ positives.detach().T), device=anchor.device)


def compute_representation_consistency(current: Tensor, reference: Tensor | None, *, epsilon: float = 1e-8) -> Tensor:
    """Mean cosine similarity between each row of ``current`` [B, D] and ``reference`` ([D] or [B, D]).

    NaN when there is no reference yet (contrastive-ft 0.4.3's convention for this function; the trainers'
    `EMAReference` starts from the first batch instead and never logs NaN).
    """
    if reference is None:
        return torch.tensor(float("nan"), device=current.device)
    reference = reference.to(current.device)
    similarity = F.normalize(current, dim=-1, eps=epsilon) * F.normalize(reference, dim=-1, eps=epsilon)
    return similarity.sum(dim=-1).mean()


def update_representation_reference(prev_reference: Tensor | None, current: Tensor, *, momentum: float = 0.9) -> Tensor:
    """EMA of the batch-mean embedding: ``momentum * prev + (1 - momentum) * mean_i(current_i)``, detached.

    (`EMAReference` does the same with the mean of the normalised rows, ``decay`` = ``momentum``.)
    """
    return ema_update(prev_reference, current.detach().mean(dim=0), momentum)


class EMAReference:
    """An exponential moving average of the batch-mean normalised embedding, as a drift reference.

    ``update(emb)``: ``ref <- decay * ref + (1 - decay) * mean(normalize(emb))`` (the first update sets ``ref``).
    ``representation_consistency(emb)``: cosine similarity between ``mean(normalize(emb))`` and ``ref``, in [-1, 1].
    Called before any reference exists, it initialises the reference from this batch and returns 1.0 — never NaN.
    Embeddings are detached; nothing here takes part in the gradient.
    """

    def __init__(self, decay: float = 0.99):
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1); got {decay}")
        self.decay = float(decay)
        self.reference: Tensor | None = None
        self.num_updates = 0

    def update(self, emb: Tensor) -> None:
        self.reference = ema_update(self.reference, _mean_direction(emb), self.decay)
        self.num_updates += 1

    def representation_consistency(self, emb: Tensor) -> float:
        mean = _mean_direction(emb)
        if self.reference is None:
            self.reference = mean.clone()
            return 1.0
        ref = self.reference.to(mean.device)
        value = float(F.cosine_similarity(mean, ref, dim=0, eps=1e-8))
        return value if value == value else 0.0  # NaN only for pathological zero vectors

    def state_dict(self) -> dict:
        ref = None if self.reference is None else self.reference.detach().cpu()
        return {"decay": self.decay, "reference": ref, "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        self.reference = None if state["reference"] is None else state["reference"].clone()
        self.num_updates = int(state.get("num_updates", 0))
