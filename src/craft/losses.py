"""The contrastive objective: pooling of hidden states, the SimCLR projection head and the InfoNCE loss.

Pooling turns per-token hidden states ``[B, T, H]`` into one vector per row ``[B, H]``, using only the positions
where the mask is 1. The mask can be an attention mask (right or left padded) or a span mask that starts in the
middle of the sequence (an assistant-span mask, for instance): every strategy looks at the mask, never at the
padding side.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from craft.errors import UserError

POOLING_STRATEGIES = ("last_token", "mean", "cls", "weighted_mean")

# CLIP clamps the learned logit scale 1/τ at 100, i.e. τ >= 0.01.
MAX_LOGIT_SCALE = 100.0


def _as_mask(hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
    """A boolean [B, T] mask (True where the mask is non-zero), checked against `hidden`."""
    if hidden.dim() != 3:
        raise UserError(f"pooling expects hidden states of shape [batch, seq, hidden]; got {tuple(hidden.shape)}")
    batch, seq = hidden.shape[:2]
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


def pool_hidden_states(hidden: Tensor, attention_mask: Tensor | None, strategy: str) -> Tensor:
    """Pool ``hidden`` [B, T, H] over the positions where ``attention_mask`` [B, T] is 1; returns [B, H].

    * ``last_token`` — the hidden state at the last position where the mask is 1 (right or left padding, or a
      span mask ending anywhere).
    * ``cls`` — the hidden state at the first position where the mask is 1.
    * ``mean`` — the mean over the masked positions.
    * ``weighted_mean`` — a weighted mean over the masked positions with weights 1, 2, ..., n in order
      (later tokens weigh more), divided by n(n+1)/2.

    ``attention_mask=None`` means every position counts. A row whose mask is all zeros is a `UserError` naming
    the row; so is an unknown strategy.
    """
    if strategy not in POOLING_STRATEGIES:
        raise UserError(f"unknown pooling strategy {strategy!r}; valid strategies: {', '.join(POOLING_STRATEGIES)}")
    mask = _as_mask(hidden, attention_mask)
    batch, seq = mask.shape
    rows = torch.arange(batch, device=hidden.device)
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
    weights = mask.to(torch.promote_types(hidden.dtype, torch.float32))
    if strategy == "weighted_mean":
        weights = torch.cumsum(weights, dim=1) * weights  # 1..n over the masked positions, 0 elsewhere
    weights = weights / weights.sum(dim=1, keepdim=True)
    return torch.bmm(weights.to(hidden.dtype).unsqueeze(1), hidden).squeeze(1)


class ProjectionHead(nn.Module):
    """SimCLR projection head: ``Linear(input_dim, hidden_dim) -> GELU -> Dropout -> Linear(hidden_dim, output_dim)``.

    ``hidden_dim`` defaults to ``input_dim``. Dropout is active only in training mode.
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
        self.fc1 = nn.Linear(self.input_dim, self.hidden_dim)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(self.hidden_dim, self.output_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.dropout(self.act(self.fc1(x))))


class InfoNCELoss(nn.Module):
    r"""InfoNCE (Oord et al., 2018) with in-batch negatives and optional extra negatives.

    For anchors :math:`a_i` and positives :math:`p_i` (``i = 0..B-1``) and optional extra negatives
    :math:`n_j` (``j = 0..N-1``), all rows are L2-normalised (:math:`\hat x = x / \lVert x \rVert_2`) and

    .. math::

        C = [\hat p_0; \dots; \hat p_{B-1}; \hat n_0; \dots; \hat n_{N-1}] \in \mathbb{R}^{(B+N) \times D}, \qquad
        \text{logits} = s \cdot \hat A C^\top \in \mathbb{R}^{B \times (B+N)},

        \mathcal{L} = \frac{1}{B} \sum_{i} -\log \frac{\exp(\text{logits}_{i,i})}{\sum_{k} \exp(\text{logits}_{i,k})}
        = \operatorname{cross\_entropy}(\text{logits}, [0, 1, \dots, B-1]).

    The logit scale is :math:`s = 1/\tau`. With a fixed temperature (default :math:`\tau = 0.05`, SimCSE) it is a
    constant. With ``learnable_temperature=True`` (CLIP) the parameter ``log_inv_temperature`` starts at
    :math:`\log(1/\tau_0)` and :math:`s = \exp(\min(\text{log\_inv\_temperature}, \log 100))`, so
    :math:`\tau \ge 0.01`. The similarities are computed in float32 whatever the input dtype.

    ``pooling`` is the strategy :meth:`pool` applies (see :func:`pool_hidden_states`).
    """

    def __init__(self, temperature: float = 0.05, learnable_temperature: bool = False, pooling: str = "last_token"):
        super().__init__()
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise UserError(f"InfoNCE temperature must be a positive number; got {temperature!r}")
        if pooling not in POOLING_STRATEGIES:
            raise UserError(f"unknown pooling strategy {pooling!r}; valid strategies: {', '.join(POOLING_STRATEGIES)}")
        if learnable_temperature and 1.0 / temperature > MAX_LOGIT_SCALE:
            raise UserError(f"a learnable temperature must start at >= {1 / MAX_LOGIT_SCALE} (its logit scale is "
                            f"clamped at {MAX_LOGIT_SCALE:g}, where it would get no gradient); got {temperature}")
        self.pooling = pooling
        self.learnable_temperature = bool(learnable_temperature)
        self.initial_temperature = float(temperature)
        if self.learnable_temperature:
            self.log_inv_temperature = nn.Parameter(torch.tensor(math.log(1.0 / temperature), dtype=torch.float32))
        else:
            self.register_parameter("log_inv_temperature", None)

    def logit_scale(self) -> Tensor | float:
        """The current 1/τ: a differentiable tensor when learnable, else a float."""
        if self.log_inv_temperature is None:
            return 1.0 / self.initial_temperature
        return self.log_inv_temperature.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()

    @property
    def temperature(self) -> float:
        """The current temperature τ as a float."""
        scale = self.logit_scale()
        return 1.0 / float(scale.detach()) if isinstance(scale, Tensor) else 1.0 / scale

    def pool(self, hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
        """`pool_hidden_states` with this loss's pooling strategy."""
        return pool_hidden_states(hidden, attention_mask, self.pooling)

    def forward(self, anchor: Tensor, positive: Tensor, negatives: Tensor | None = None,
                return_logits: bool = False):
        """Mean InfoNCE over the batch; ``(loss, logits)`` when ``return_logits`` (logits [B, B+N], float32)."""
        if anchor.dim() != 2 or positive.shape != anchor.shape:
            raise ValueError(f"InfoNCE expects anchor and positive of the same shape [batch, dim]; got "
                             f"{tuple(anchor.shape)} and {tuple(positive.shape)}")
        candidates = positive.float()
        if negatives is not None:
            if negatives.dim() != 2 or negatives.shape[1] != anchor.shape[1]:
                raise ValueError(f"InfoNCE negatives must have shape [num_negatives, {anchor.shape[1]}]; got "
                                 f"{tuple(negatives.shape)}")
            candidates = torch.cat([candidates, negatives.float()], dim=0)
        a = F.normalize(anchor.float(), dim=-1)
        c = F.normalize(candidates, dim=-1)
        scale = self.logit_scale()
        if isinstance(scale, Tensor):
            scale = scale.to(a.device)
        logits = (a @ c.T) * scale
        target = torch.arange(anchor.shape[0], device=logits.device)
        loss = F.cross_entropy(logits, target)
        return (loss, logits) if return_logits else loss

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature:.4g}, learnable_temperature={self.learnable_temperature}, "
                f"pooling={self.pooling!r}")
