"""`ControlAdapter`: the per-layer module that turns a residual write delta into its class-dependent transform.

Notation (shapes for one decoder layer, hidden size h, rank r):

* delta: (..., h), a residual write (a sublayer output, or the whole block delta `layer(h) - h`).
* W = s * B @ A, with A: (r, h), B: (h, r), s a float. "lowrank" stores A and B and uses s = alpha / rank;
  "symmetric" stores Q: (h, r) and S: (r,) and uses A = Q^T, B = Q diag(exp(S) - 1), s = 1,
  i.e. W = Q diag(exp(S) - 1) Q^T. `strength` multiplies W (s -> strength * s).
* class +1: delta -> (I + W) delta.
* class -1: delta -> (I + W)^{-1} delta. With K = s A @ B (r x r):
  exact (Woodbury):  (I + s B A)^{-1} = I - s B (I_r + K)^{-1} A;
  neumann (order n): sum_{k=0..n} (-W)^k = I + s B (sum_{k=1..n} (-1)^k K^{k-1}) A.
  For "symmetric" with orthonormal Q the Woodbury form equals Q diag(exp(-S) - 1) Q^T, and unlike that
  closed form it stays the exact inverse when Q drifts from orthonormality between orthogonality steps.
* class 0: delta unchanged.

Every class is `delta + s * B @ C_class @ A @ delta` for an r x r "core" C (+1: I, -1: as above, 0: 0), so a batch
mixing classes costs one projection onto A, a per-token choice of core, and one projection back through B — the
same matmuls as a LoRA of rank r. The module returns the *change* `T(delta) - delta` rather than `T(delta)`: adding
it to the residual write keeps the base model bit-identical at initialisation (B = 0 or S = 0 give a change of
exactly zero) and avoids the cancellation of recomputing `h + (layer(h) - h)`.

Auxiliary loss on neutral tokens (class 0): for each neutral token the ratio ||W delta||^2 / ||delta||^2 — the
relative size of the change the +1 transform *would* make — averaged over the neutral tokens of all residual writes
this adapter saw in the last forward of its layer (two writes per token for target "sublayers", one for "block").
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import UserError
from .config import ControlAdapterConfig


class ControlAdapter(nn.Module):
    """Control Adapter of one decoder layer.

    Args:
        hidden_size: h.
        config: the shared `ControlAdapterConfig`.
        layer_index: index of the decoder layer this adapter belongs to (used in save files and messages).
        device: where to create the parameters.

    Routing state (set by `set_control_classes` / `control_class`, never saved): `classes` (None, an int, or a
    LongTensor shaped like the tokens), `default_class` (used when `classes` is None; +1 unless a `control_class`
    context says otherwise), `strength` (W -> strength * W) and `token_mask` (tokens counted by the aux loss).
    """

    def __init__(self, hidden_size: int, config: ControlAdapterConfig, layer_index: int, device=None):
        super().__init__()
        if config.rank > hidden_size:
            raise UserError(f"control adapter 'rank' ({config.rank}) must not exceed the hidden size ({hidden_size})")
        self.hidden_size = hidden_size
        self.rank = config.rank
        self.type = config.type
        self.inverse = config.inverse
        self.neumann_order = config.neumann_order
        self.gamma = config.gamma
        self.class0_lambda = config.class0_lambda
        self.scale = config.scale if config.type == "lowrank" else 1.0
        self.layer_index = layer_index
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        dtype = getattr(torch, config.dtype)
        if config.type == "lowrank":
            a = torch.empty(config.rank, hidden_size, device=device)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # the LoRA default for A
            self.A = nn.Parameter(a.to(dtype))
            self.B = nn.Parameter(torch.zeros(hidden_size, config.rank, device=device, dtype=dtype))
        else:
            q, _ = torch.linalg.qr(torch.randn(hidden_size, config.rank, device=device))
            self.Q = nn.Parameter(q.to(dtype))
            self.S = nn.Parameter(torch.zeros(config.rank, device=device, dtype=dtype))
        self.classes = None
        self.default_class = 1
        self.strength = 1.0
        self.token_mask = None
        self.reset_aux()

    def extra_repr(self) -> str:
        return (f"layer={self.layer_index}, hidden={self.hidden_size}, rank={self.rank}, type={self.type}, "
                f"inverse={self.inverse}, scale={self.scale:.4g}")

    @property
    def compute_dtype(self) -> torch.dtype:
        """float32, or float64 when the parameters are float64 (tests)."""
        return torch.promote_types(next(self.parameters()).dtype, torch.float32)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A (r, h), B (h, r), s) in the compute dtype, with W = s * B @ A (strength not applied)."""
        dtype = self.compute_dtype
        if self.type == "lowrank":
            return self.A.to(dtype), self.B.to(dtype), self.scale
        q = self.Q.to(dtype)
        return q.T, q * torch.expm1(self.S.to(dtype)), 1.0

    def weight_matrix(self) -> torch.Tensor:
        """W = s * B @ A, (h, h), in the compute dtype."""
        a, b, s = self.factors()
        return s * b @ a

    def negative_core(self, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
        """C_-1 (r, r) with (I + s B A)^{-1} - I = s B C_-1 A (exact) or its Neumann truncation (see module doc)."""
        eye = torch.eye(self.rank, dtype=a.dtype, device=a.device)
        k = s * a @ b
        if self.inverse == "exact":
            return -torch.linalg.solve(eye + k, eye)
        core, power = torch.zeros_like(eye), eye
        for order in range(1, self.neumann_order + 1):
            core = core + (-1) ** order * power
            power = power @ k
        return core

    def effective_factors(self, direction: int = 1, strength: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B', s') with T - I = s' B' A for the transform T of class `direction` at `strength`.

        direction +1 gives (A, B, strength * s), the factors of W itself (for "symmetric": A = Q^T,
        B = Q diag(exp(S) - 1)); -1 gives B' = B @ C_-1; 0 gives B' = 0. Used by export (LoRA conversion).
        """
        a, b, s = self.factors()
        s = s * strength
        if direction == 1:
            return a, b, s
        if direction == -1:
            return a, b @ self.negative_core(a, b, s), s
        if direction == 0:
            return a, torch.zeros_like(b), s
        raise UserError(f"control class direction must be -1, 0 or 1, got {direction!r}")

    def forward(self, delta: torch.Tensor) -> torch.Tensor:
        """T(delta) for the current classes: (..., h) -> (..., h), in delta's dtype."""
        change = self.delta_change(delta.to(self.compute_dtype))
        return delta if change is None else (delta.to(change.dtype) + change).to(delta.dtype)

    def current_classes(self, token_shape: torch.Size):
        """The int class for all tokens, or a LongTensor of shape `token_shape` (checked)."""
        classes = self.default_class if self.classes is None else self.classes
        if isinstance(classes, torch.Tensor) and classes.shape != token_shape:
            raise UserError(f"control_classes has shape {tuple(classes.shape)} but decoder layer {self.layer_index} "
                            f"sees tokens of shape {tuple(token_shape)}; give one class per token position")
        return classes

    def delta_change(self, delta: torch.Tensor) -> torch.Tensor | None:
        """T(delta) - delta, (..., h) in the compute dtype, or None when no token changes and no aux is due.

        Also records the class-0 aux ratios when `class0_lambda > 0` (see module doc).
        """
        classes = self.current_classes(delta.shape[:-1])
        uniform = not isinstance(classes, torch.Tensor)
        wants_aux = self.class0_lambda > 0 and (not uniform or classes == 0)
        if uniform and classes == 0 and not wants_aux:
            return None
        a, b, s = self.factors()
        s = s * self.strength
        z = self.dropout(delta) @ a.T  # (..., r)
        if wants_aux:
            neutral = classes == 0 if not uniform else torch.ones(delta.shape[:-1], dtype=torch.bool, device=z.device)
            self._record_aux(delta, z, b, s, neutral)
        if uniform:
            if classes == 0:
                return None
            u = z if classes == 1 else z @ self.negative_core(a, b, s).T
        else:
            classes = classes.to(z.device).unsqueeze(-1)
            negative = z @ self.negative_core(a, b, s).T
            u = torch.where(classes == 1, z, torch.where(classes == -1, negative, torch.zeros_like(z)))
        return s * (u @ b.T)

    def _record_aux(self, delta, z, b, s, neutral):
        if self.token_mask is not None and self.token_mask.shape == neutral.shape:
            neutral = neutral & self.token_mask.to(neutral.device).bool()
        change = s * (z[neutral] @ b.T)  # W delta of the neutral tokens, (n, h)
        size = delta[neutral].pow(2).sum(-1).clamp_min(torch.finfo(delta.dtype).tiny)
        self._aux_sum = self._aux_sum + (change.pow(2).sum(-1) / size).sum()
        self._aux_count = self._aux_count + neutral.sum()

    def reset_aux(self):
        """Forget the aux terms; called when the adapter's layer starts a forward."""
        self._aux_sum = 0.0
        self._aux_count = 0

    def aux_value(self) -> torch.Tensor:
        """Mean ||W delta||^2 / ||delta||^2 over the neutral tokens of the last forward (0 if there were none)."""
        if isinstance(self._aux_count, int) and self._aux_count == 0:
            return torch.zeros((), device=next(self.parameters()).device)
        return self._aux_sum / self._aux_count.clamp_min(1)
