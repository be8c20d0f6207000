"""The contrastive objective: pooling of hidden states, the SimCLR projection head and the InfoNCE loss.

Pooling turns per-token hidden states ``[B, T, H]`` into one vector per row ``[B, H]``, using only the positions
where the mask is 1. The mask can be an attention mask (right or left padded) or a span mask that starts in the
middle of the sequence (an assistant-span mask, for instance): every strategy looks at the mask, never at the
padding side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from craft.errors import UserError

POOLING_STRATEGIES = ("last_token", "mean", "cls", "weighted_mean")

# CLIP clamps the learned logit scale 1/τ at 100, i.e. τ >= 0.01.
MAX_LOGIT_SCALE = 100.0


def _as_mask(hidden: Tensor, attention_mask: Tensor | None, rows: Tensor | None = None) -> Tensor:
    """A boolean [B, T] mask (True where the mask is non-zero), checked against `hidden` (B = len(rows) if given)."""
    if hidden.dim() != 3:
        raise UserError(f"pooling expects hidden states of shape [batch, seq, hidden]; got {tuple(hidden.shape)}")
    batch, seq = hidden.shape[:2]
    if rows is not None:
        batch = rows.shape[0]
    if attention_mask is None:
        return torch.ones(batch, seq, dtype=torch.bool, device=hidden.device)
    if tuple(attention_mask.shape) != (batch, seq):
        raise UserError(f"pooling mask has shape {tuple(attention_mask.shape)}; expected [batch, seq] = "
                        f"{(batch, seq)} to match the hidden states {tuple(hidden.shape)}")
    mask = attention_mask.to(device=hidden.device) != 0
    empty = (~mask.any(dim=1)).nonzero().flatten()
    if empty.numel():
        rows = empty.tolist()
        raise UserError(f"cannot pool row{'s' if len(rows) > 1 else ''} {', '.join(map(str, rows))} of the batch: "
                        "its mask is all zeros (no token to pool; for self-align, a row without assistant tokens)")
    return mask


def pool_hidden_states(hidden_states: Tensor, attention_mask: Tensor | None, strategy: str,
                       weights: Tensor | None = None, rows: Tensor | None = None) -> Tensor:
    """Pool ``hidden_states`` [B, T, H] over the positions where ``attention_mask`` [B, T] is 1; returns [B, H].

    With ``rows`` [S] (packed batches: several conversations per row, `craft.packing.packed_segments`),
    ``attention_mask`` is [S, T] and output ``s`` pools row ``rows[s]`` over ``attention_mask[s]``; returns
    [S, H] (no [S, T, H] copy).

    * ``last_token`` — the hidden state at the last position where the mask is 1 (right or left padding, or a
      span mask ending anywhere).
    * ``cls`` — the hidden state at the first position where the mask is 1.
    * ``mean`` — the mean over the masked positions.
    * ``weighted_mean`` — a weighted mean over the masked positions with weights 1, 2, ..., n in order
      (later tokens weigh more), divided by n(n+1)/2; or, with ``weights`` [T] (contrastive-ft 0.4.3's
      argument), ``Σ_t w_t m_t h_t / Σ_t w_t m_t``.

    ``attention_mask=None`` means every position counts. A row whose mask is all zeros is a `UserError` naming
    the row; so is an unknown strategy.
    """
    hidden = hidden_states
    if strategy not in POOLING_STRATEGIES:
        raise UserError(f"unknown pooling strategy {strategy!r}; valid strategies: {', '.join(POOLING_STRATEGIES)}")
    mask = _as_mask(hidden, attention_mask, rows)
    batch, seq = mask.shape
    packed = rows is not None
    rows = rows.to(hidden.device) if packed else torch.arange(batch, device=hidden.device)
    if strategy == "last_token":
        positions = torch.arange(seq, device=hidden.device).expand(batch, seq)
        index = torch.where(mask, positions, -1).amax(dim=1)
        return hidden[rows, index]
    if strategy == "cls":
        positions = torch.arange(seq, device=hidden.device).expand(batch, seq)
        index = torch.where(mask, positions, seq).amin(dim=1)
        return hidden[rows, index]
    # Weights are built and normalised in float32 at least (bf16 counts exactly only up to 256), then applied in
    # the hidden states' dtype so no float32 copy of [B, T, H] is made.
    mask_weights = mask.to(torch.promote_types(hidden.dtype, torch.float32))
    if strategy == "weighted_mean" and weights is not None:
        if weights.shape != (seq,):
            raise UserError(f"weighted_mean pooling weights must have shape [seq] = [{seq}]; got {tuple(weights.shape)}")
        mask_weights = mask_weights * weights.to(mask_weights)
    elif strategy == "weighted_mean":
        mask_weights = torch.cumsum(mask_weights, dim=1) * mask_weights  # 1..n over masked positions, 0 elsewhere
    mask_weights = (mask_weights / mask_weights.sum(dim=1, keepdim=True)).to(hidden.dtype)
    if not packed:
        return torch.bmm(mask_weights.unsqueeze(1), hidden).squeeze(1)
    out = hidden.new_empty(batch, hidden.shape[2])
    for row in rows.unique().tolist():  # each row's conversations: [S_row, T] @ [T, H]
        chosen = (rows == row).nonzero().flatten()
        out = out.index_copy(0, chosen, mask_weights[chosen] @ hidden[row])
    return out


class ProjectionHead(nn.Module):
    """SimCLR projection head: ``Linear(input_dim, hidden_dim) -> GELU -> Dropout -> Linear(hidden_dim, output_dim)``,
    then L2 normalisation: ``forward(x [.., input_dim]) -> [.., output_dim]`` with unit rows.

    ``hidden_dim`` defaults to ``input_dim``. Dropout is active only in training mode. The layers are ``net``
    (an ``nn.Sequential``, as in contrastive-ft 0.4.3); ``fc1`` / ``fc2`` name its two linear layers. The
    normalisation costs nothing downstream: InfoNCE normalises again, and normalising twice is normalising once.
    Positional order is ``(input_dim, output_dim, hidden_dim, dropout)``; contrastive-ft's was
    ``(input_dim, hidden_dim, output_dim, dropout)`` — keyword calls mean the same in both.
    """

    def __init__(self, input_dim: int, output_dim: int = 256, hidden_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        hidden_dim = input_dim if hidden_dim is None else hidden_dim
        for name, value in (("input_dim", input_dim), ("output_dim", output_dim), ("hidden_dim", hidden_dim)):
            if int(value) <= 0:
                raise UserError(f"ProjectionHead {name} must be a positive integer; got {value}")
        if not 0.0 <= dropout < 1.0:
            raise UserError(f"ProjectionHead dropout must be in [0, 1); got {dropout}")
        self.input_dim, self.hidden_dim, self.output_dim = int(input_dim), int(hidden_dim), int(output_dim)
        self.net = nn.Sequential(nn.Linear(self.input_dim, self.hidden_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(self.hidden_dim, self.output_dim))

    @property
    def fc1(self) -> nn.Linear:
        return self.net[0]

    @property
    def fc2(self) -> nn.Linear:
        return self.net[3]

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.net(x), dim=-1)


class InfoNCELoss(nn.Module):
    r"""InfoNCE (Oord et al., 2018) with in-batch negatives and optional extra negatives.

    For anchors :math:`a_i` and positives :math:`p_i` (``i = 0..B-1``) and optional extra negatives
    :math:`n_j` (``j = 0..N-1``), all rows are L2-normalised (:math:`\hat x = x / \lVert x \rVert_2`) and

    .. math::

        C = [\hat p_0; \dots; \hat p_{B-1}; \hat n_0; \dots; \hat n_{N-1}] \in \mathbb{R}^{(B+N) \times D}, \qquad
        \text{logits} = \hat A C^\top / \tau \in \mathbb{R}^{B \times (B+N)},

        \mathcal{L} = \frac{1}{B} \sum_{i} -\log \frac{\exp(\text{logits}_{i,i})}{\sum_{k} \exp(\text{logits}_{i,k})}
        = \operatorname{cross\_entropy}(\text{logits}, [0, 1, \dots, B-1]).

    ``log_temperature`` holds :math:`\log \tau`: a buffer for a fixed temperature (default :math:`\tau = 0.05`,
    SimCSE), a parameter with ``learnable_temperature=True`` (CLIP), clamped so that :math:`\tau \ge 0.01` (a
    logit scale of at most 100). The similarities are computed in float32 whatever the input dtype.
    ``reduction`` is cross-entropy's ("mean", "sum" or "none").

    Two call conventions (the first is what the CRAFT trainers use):

    * ``loss(anchor [B, D], positive [B, D], negatives=None, return_logits=False)`` — already projected
      embeddings (negatives [N, D] positionally or by keyword); ``(loss, logits)`` when ``return_logits``.
    * ``loss(hidden_anchor [B, T, H], hidden_positive [B, T, H], mask_anchor [B, T], mask_positive [B, T],
      return_details=False, additional_negatives=None)`` — contrastive-ft 0.4.3's: the hidden states are pooled
      (``pooling``, see :func:`pool_hidden_states`) and projected by ``projector``, a `ProjectionHead`
      ``hidden_size -> projection_dim`` (built here when ``hidden_size`` is given, else on the first such call).
      ``return_details`` adds a dict with the projected ``anchor_embeddings`` / ``positive_embeddings``, the
      ``logits`` and the ``temperature`` (all detached). `forward_from_pooled` takes pooled [B, H] states.
    """

    def __init__(self, temperature: float = 0.05, reduction: str = "mean", hidden_size: int | None = None,
                 projection_dim: int = 256, pooling: str = "last_token", learnable_temperature: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise UserError(f"InfoNCE temperature must be a positive number; got {temperature!r}")
        if pooling not in POOLING_STRATEGIES:
            raise UserError(f"unknown pooling strategy {pooling!r}; valid strategies: {', '.join(POOLING_STRATEGIES)}")
        if reduction not in ("mean", "sum", "none"):
            raise UserError(f"InfoNCE reduction must be 'mean', 'sum' or 'none'; got {reduction!r}")
        if learnable_temperature and 1.0 / temperature > MAX_LOGIT_SCALE:
            raise UserError(f"a learnable temperature must start at >= {1 / MAX_LOGIT_SCALE} (its logit scale is "
                            f"clamped at {MAX_LOGIT_SCALE:g}, where it would get no gradient); got {temperature}")
        self.pooling, self.reduction = pooling, reduction
        self.learnable_temperature = bool(learnable_temperature)
        self.initial_temperature = float(temperature)
        self.projection_dim, self.dropout = int(projection_dim), float(dropout)
        log_temperature = torch.tensor(math.log(temperature), dtype=torch.float32)
        if self.learnable_temperature:
            # Shape [1], not a 0-dim scalar: DeepSpeed broadcasts and partitions parameters through byte views,
            # which a 0-dim tensor does not have.
            self.log_temperature = nn.Parameter(log_temperature.reshape(1))
        else:
            self.register_buffer("log_temperature", log_temperature)
        self.projector: ProjectionHead | None = None
        if hidden_size is not None:
            self.projector = ProjectionHead(hidden_size, self.projection_dim, dropout=self.dropout)

    def logit_scale(self) -> Tensor:
        """The current 1/τ (differentiable when the temperature is learnable)."""
        if self.learnable_temperature:
            return (-self.log_temperature.clamp(min=-math.log(MAX_LOGIT_SCALE))).exp().reshape(())
        return (-self.log_temperature).exp()

    @property
    def temperature(self) -> Tensor:
        """The current temperature τ (clamped as in the loss), a detached scalar tensor."""
        return (1.0 / self.logit_scale()).detach()

    def pool(self, hidden: Tensor, attention_mask: Tensor | None, rows: Tensor | None = None) -> Tensor:
        """`pool_hidden_states` with this loss's pooling strategy (``rows``: packed batches, one per mask row)."""
        return pool_hidden_states(hidden, attention_mask, self.pooling, rows=rows)

    def _project(self, pooled: Tensor) -> Tensor:
        if self.projector is None:  # contrastive-ft's lazy head: sized by the first hidden states seen
            head = ProjectionHead(pooled.shape[-1], self.projection_dim, dropout=self.dropout)
            self.projector = head.to(pooled.device)
        return self.projector(pooled.to(self.projector.fc1.weight.dtype))

    def forward(self, anchor: Tensor | None = None, positive: Tensor | None = None, mask_anchor: Tensor | None = None,
                mask_positive: Tensor | None = None, *, negatives: Tensor | None = None, return_logits: bool = False,
                return_details: bool = False, additional_negatives: Tensor | None = None,
                hidden_states_anchor: Tensor | None = None, hidden_states_positive: Tensor | None = None):
        """InfoNCE of embeddings [B, D] or, with hidden states [B, T, H] and masks, of their pooled projections.

        With embeddings, masks mean nothing: a third positional argument is the negatives [N, D].
        ``hidden_states_anchor`` / ``hidden_states_positive`` are contrastive-ft's keyword names for the first two.
        """
        anchor = hidden_states_anchor if anchor is None else anchor
        positive = hidden_states_positive if positive is None else positive
        if anchor is None or positive is None:
            raise ValueError("InfoNCE needs an anchor and a positive (embeddings or hidden states)")
        if anchor.dim() == 2 and mask_anchor is not None:
            if negatives is not None:
                raise ValueError("InfoNCE got negatives twice (positionally and as negatives=)")
            negatives, mask_anchor = mask_anchor, None
        if additional_negatives is not None:
            negatives = additional_negatives if negatives is None else torch.cat([negatives, additional_negatives])
        if anchor.dim() == 3:
            return self.forward_from_pooled(self.pool(anchor, mask_anchor), self.pool(positive, mask_positive),
                                            additional_negatives=negatives, return_details=return_details)
        loss, logits = self._infonce(anchor, positive, negatives)
        if return_details:
            return loss, self._details(anchor, positive, logits)
        return (loss, logits) if return_logits else loss

    def forward_from_pooled(self, anchor_pooled: Tensor, positive_pooled: Tensor, *,
                            additional_negatives: Tensor | None = None, return_details: bool = False):
        """InfoNCE of ``projector(anchor_pooled)`` and ``projector(positive_pooled)`` (pooled states [B, H])."""
        anchor, positive = self._project(anchor_pooled), self._project(positive_pooled)
        loss, logits = self._infonce(anchor, positive, additional_negatives)
        return (loss, self._details(anchor, positive, logits)) if return_details else loss

    def _details(self, anchor: Tensor, positive: Tensor, logits: Tensor) -> dict[str, Tensor]:
        return {"anchor_embeddings": F.normalize(anchor.detach().float(), dim=-1),
                "positive_embeddings": F.normalize(positive.detach().float(), dim=-1),
                "logits": logits.detach(), "temperature": self.temperature}

    def _infonce(self, anchor: Tensor, positive: Tensor, negatives: Tensor | None) -> tuple[Tensor, Tensor]:
        if anchor.dim() != 2 or positive.shape != anchor.shape:
            raise ValueError(f"InfoNCE expects anchor and positive of the same shape [batch, dim]; got "
                             f"{tuple(anchor.shape)} and {tuple(positive.shape)}")
        candidates = positive.float()
        if negatives is not None and negatives.shape[0] > 0:
            if negatives.dim() != 2 or negatives.shape[1] != anchor.shape[1]:
                raise ValueError(f"InfoNCE negatives must have shape [num_negatives, {anchor.shape[1]}]; got "
                                 f"{tuple(negatives.shape)}")
            candidates = torch.cat([candidates, negatives.to(candidates.device).float()], dim=0)
        a = F.normalize(anchor.float(), dim=-1)
        c = F.normalize(candidates, dim=-1)
        scale = self.logit_scale().to(a.device)
        # The temperature this call used, readable after it even where an engine re-shards the parameter.
        self.last_logit_scale = scale.detach()
        logits = (a @ c.T) * scale
        target = torch.arange(anchor.shape[0], device=logits.device)
        return F.cross_entropy(logits, target, reduction=self.reduction), logits

    def extra_repr(self) -> str:
        return (f"temperature={float(self.temperature):.4g}, learnable_temperature={self.learnable_temperature}, "
                f"pooling={self.pooling!r}")


_pool_hidden_states = pool_hidden_states  # contrastive-ft 0.4.3's former name


@dataclass
class CRAFTLossOutputs:
    """The terms of `combine_craft_losses`: ``total_loss = alpha * sft_loss + (1 - alpha) * contrastive_loss``."""

    total_loss: Tensor
    sft_loss: Tensor
    contrastive_loss: Tensor


def combine_craft_losses(*, sft_loss: Tensor, contrastive_loss: Tensor, alpha: float) -> CRAFTLossOutputs:
    """``alpha * sft_loss + (1 - alpha) * contrastive_loss`` with alpha clamped to [0, 1] (contrastive-ft 0.4.3).

    For one forward that has both losses. Over an accumulation window whose micro-batches hold one loss each, the
    exact weights are `craft.accumulator.AccumulationScaler`'s (the CRAFT trainers use those).
    """
    alpha = min(max(float(alpha), 0.0), 1.0)
    total = alpha * sft_loss + (1.0 - alpha) * contrastive_loss
    return CRAFTLossOutputs(total_loss=total, sft_loss=sft_loss, contrastive_loss=contrastive_loss)
