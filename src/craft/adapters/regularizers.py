"""Regularisers and monitors for low-rank adapters: composite weight decay, orthogonality step, statistics.

Composite decoupled weight decay (one implementation for lowrank Control Adapters and PEFT LoRA): for a factor
triple (A (r, in), B (out, r), s) with W = s B A, after the optimizer step apply one SGD step on
lambda * 1/2 ||W||_F^2, both gradients taken at the same old W:

    A <- A - lr * lambda * s * B^T W = A - lr * lambda * s^2 (B^T B) A
    B <- B - lr * lambda * s * W A^T = B - lr * lambda * s^2 B (A A^T)

(the right-hand forms are the same numbers without building the out x in matrix W). The "decay amount" logged as
`weight_decay_avg/max` is ||W_new - W_old||_F of the last decay step, per factor pair.
"""

from __future__ import annotations

import warnings

import torch

from .layer import ControlAdapter
from .model import control_adapters

# The last decay amount ||Delta W||_F of a factor pair is kept as this attribute of its A tensor (identity-bound,
# lives exactly as long as the parameter).
_LAST_DECAY_ATTRIBUTE = "_craft_last_composite_decay"


def lora_factor_pairs(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """(A, B, s) for every PEFT LoRA adapter in `model`: `lora_A[name].weight`, `lora_B[name].weight`,
    `scaling[name]`, for every adapter name."""
    pairs = []
    for module in model.modules():
        lora_a, lora_b, scaling = (getattr(module, n, None) for n in ("lora_A", "lora_B", "scaling"))
        if not isinstance(lora_a, torch.nn.ModuleDict) or not isinstance(scaling, dict):
            continue
        for name in lora_a:
            if name in lora_b and hasattr(lora_a[name], "weight"):
                pairs.append((lora_a[name].weight, lora_b[name].weight, float(scaling[name])))
    return pairs


def control_adapter_factor_pairs(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """(A, B, s) parameter triples of the lowrank Control Adapters in `model` (symmetric ones have no A/B)."""
    return [(a.A, a.B, a.scale) for a in control_adapters(model) if a.type == "lowrank"]


def lowrank_frobenius(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """||left @ right||_F for left (m, k), right (k, n), via sqrt(trace((L^T L)(R R^T))) — k x k work only."""
    return torch.trace((left.T @ left) @ (right @ right.T)).clamp_min(0).sqrt()


@torch.no_grad()
def composite_weight_decay_(pairs, lr: float, weight_decay: float) -> list[float]:
    """Apply composite decoupled weight decay in place to each (A, B, s) in `pairs` (module doc formulas).

    Pairs whose A or B is not float32/float64 are skipped with one warning (the update would cancel out in
    bfloat16). Returns the decay amount ||Delta W||_F of each pair that was updated.
    """
    amounts, skipped = [], 0
    if weight_decay == 0 or lr == 0:
        return amounts
    step = lr * weight_decay
    for a, b, s in pairs:
        if a.dtype not in (torch.float32, torch.float64) or b.dtype not in (torch.float32, torch.float64):
            skipped += 1
            continue
        grad_a = s * s * (b.T @ b) @ a
        grad_b = s * s * b @ (a @ a.T)
        # Delta W / s = (B - step gB)(A - step gA) - B A = (-step gB) A + (step gB - B) step gA, no cancellation.
        left = torch.cat([-step * grad_b, step * (step * grad_b - b)], dim=1)
        right = torch.cat([a, grad_a], dim=0)
        amount = float(abs(s) * lowrank_frobenius(left, right))
        a.sub_(step * grad_a)
        b.sub_(step * grad_b)
        setattr(a, _LAST_DECAY_ATTRIBUTE, amount)
        amounts.append(amount)
    if skipped:
        warnings.warn(f"composite weight decay skipped for {skipped} adapter factor pair(s) that are not float32 "
                      f"(low-precision decay cancels out); use float32 adapter weights to enable it", stacklevel=2)
    return amounts


@torch.no_grad()
def orthogonality_step_(model: torch.nn.Module, gamma: float | None = None) -> float:
    """Q <- Q - gamma Q (Q^T Q - I) for every symmetric Control Adapter (gamma defaults to each adapter's config).

    Returns the largest ||Q^T Q - I||_F after the step (0.0 if there are no symmetric adapters).
    """
    worst = 0.0
    for adapter in control_adapters(model):
        if adapter.type != "symmetric":
            continue
        q = adapter.Q.to(adapter.compute_dtype)
        step = adapter.gamma if gamma is None else gamma
        q = q - step * q @ (q.T @ q - torch.eye(q.shape[1], dtype=q.dtype, device=q.device))
        adapter.Q.copy_(q.to(adapter.Q.dtype))
        worst = max(worst, orthogonality_error(adapter))
    return worst


def orthogonality_error(adapter: ControlAdapter) -> float:
    """||Q^T Q - I||_F of a symmetric adapter."""
    q = adapter.Q.detach().to(adapter.compute_dtype)
    return float(torch.linalg.matrix_norm(q.T @ q - torch.eye(q.shape[1], dtype=q.dtype, device=q.device)))


def spectral_norm(a: torch.Tensor, b: torch.Tensor, s: float) -> float:
    """||s B A||_2, exactly, from the factors: with B = Q_B R_B and A^T = Q_A R_A, it is |s| sigma_max(R_B R_A^T)
    (two thin QRs and an r x r SVD)."""
    _, r_b = torch.linalg.qr(b.detach().float())
    _, r_a = torch.linalg.qr(a.detach().float().T)
    return float(abs(s) * torch.linalg.matrix_norm(r_b @ r_a.T, ord=2))


@torch.no_grad()
def adapter_stats(model: torch.nn.Module) -> dict[str, float]:
    """Monitoring numbers for the Control Adapters (or, if there are none, the PEFT LoRA adapters) of `model`.

    Keys: `norm_avg`, `norm_max` — ||W||_F over adapters; `spectral_norm_max` — max ||strength W||_2;
    `weight_decay_avg`, `weight_decay_max` — ||Delta W||_F of the last `composite_weight_decay_` step (only
    when one was recorded); `orthogonality_error` — max ||Q^T Q - I||_F (symmetric adapters only).
    Warns when an adapter with `inverse="neumann"` has ||strength W||_2 >= 1, where the series diverges.
    """
    adapters = list(control_adapters(model))
    if adapters:
        triples = [a.factors() for a in adapters]
        strengths = [a.strength for a in adapters]
    else:
        triples = lora_factor_pairs(model)
        strengths = [1.0] * len(triples)
    if not triples:
        return {}
    norms = [abs(s) * float(lowrank_frobenius(b.detach().float(), a.detach().float())) for a, b, s in triples]
    spectral = [spectral_norm(a, b, s * k) for (a, b, s), k in zip(triples, strengths)]
    stats = {"norm_avg": sum(norms) / len(norms), "norm_max": max(norms), "spectral_norm_max": max(spectral)}
    decay_keys = [a.A for a in adapters if a.type == "lowrank"] if adapters else [a for a, _, _ in triples]
    decays = [getattr(k, _LAST_DECAY_ATTRIBUTE) for k in decay_keys if hasattr(k, _LAST_DECAY_ATTRIBUTE)]
    if decays:
        stats["weight_decay_avg"] = sum(decays) / len(decays)
        stats["weight_decay_max"] = max(decays)
    symmetric = [a for a in adapters if a.type == "symmetric"]
    if symmetric:
        stats["orthogonality_error"] = max(orthogonality_error(a) for a in symmetric)
    diverging = [a.layer_index for a, norm in zip(adapters, spectral) if a.inverse == "neumann" and norm >= 1]
    if diverging:
        warnings.warn(f"control adapter ||W||_2 >= 1 on layers {diverging}: the Neumann inverse series diverges; "
                      f"raise the weight decay or use inverse='exact'", stacklevel=2)
    return stats
