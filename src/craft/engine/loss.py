"""Next-token cross-entropy of the last pipeline stage, with or without the full-vocabulary logits in memory.

Shapes: hidden (B, S, H) = the final norm's output; labels (B, S) int64 with -100 = ignored; V = vocabulary.
The target of position t is `labels[:, t+1]` (the last position has none), and the loss is the token mean

    L = sum_{t: target_t != -100} -log softmax(z_t)[target_t]  /  #{t: target_t != -100},

with z_t = head(hidden_t) the logits (lm_head, then Cohere's logit_scale or Gemma 2's softcap, in the model dtype,
then float32 for the softmax) — the value of HF's `ForCausalLMLoss`. With no counted token it is 0/0 = nan, as there.

* `chunk_size = 0`: the plain loss. All B*S*V logits exist at once, in the model dtype and again in float32, and the
  backward pass holds a few more float32 copies: about 5 * 4 * B*S*V bytes at the peak (10.9 GiB at S = 4096 and a
  128256-token vocabulary).
* `chunk_size = c > 0`: the B*S positions are cut into chunks of c. In the forward pass each chunk's logits,
  its summed NLL and, by autograd on that chunk alone, its gradients are computed and the logits freed; the
  backward pass only multiplies the kept gradients by the incoming one. Kept between the passes: dL/dhidden
  (B, S, H) and the gradients of the head's trained parameters (lm_head for full fine-tuning, a LoRA on lm_head).
  So the peak working set is a few copies of c*V logits whatever S is, the FLOPs are the plain loss's (no
  recompute: the backward work is done while the chunk is at hand), and the gradients are the plain loss's — the
  same sum, split into chunks. Without gradients (evaluation) the chunks are only summed.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

# 256 tokens x 128256 (Llama 3 vocabulary) x 4 bytes = 131 MB per float32 copy of a chunk's logits, ~0.6 GB for the
# whole chunk working set (logits in the model dtype, their float32 copy, log-softmax, its gradient): 1/16 of the
# plain loss at 4096 tokens and 1/128 at 32768, while a (256 x H) @ (H x V) matmul still keeps a GPU busy.
DEFAULT_CHUNK_SIZE = 256


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """(B, S) -> (B, S): position t's target is labels[:, t+1]; the last position gets -100 (no target)."""
    return F.pad(labels[:, 1:], (0, 1), value=-100)


def _chunk_nll(logits_fn: Callable, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed NLL of one chunk: hidden (n, H), targets (n,) -> scalar float32."""
    return F.cross_entropy(logits_fn(hidden).float(), targets, ignore_index=-100, reduction="sum")


class _ChunkedNLL(torch.autograd.Function):
    """Summed NLL over chunks of `hidden` (N, H); gradients for `hidden` and `params` computed in forward."""

    @staticmethod
    def forward(ctx, hidden, targets, logits_fn, chunk_size, *params):
        grad_hidden = torch.zeros_like(hidden) if hidden.requires_grad else None
        grad_params = [torch.zeros_like(p) for p in params]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            part = hidden[start:start + chunk_size].detach().requires_grad_(hidden.requires_grad)
            with torch.enable_grad():
                nll = _chunk_nll(logits_fn, part, targets[start:start + chunk_size])
            grads = list(torch.autograd.grad(nll, ([part] if hidden.requires_grad else []) + list(params),
                                             allow_unused=True))
            if hidden.requires_grad:
                grad_hidden[start:start + chunk_size] = grads.pop(0)
            for accumulated, grad in zip(grad_params, grads):
                if grad is not None:
                    accumulated += grad
            total += nll.detach()
        ctx.grads = (grad_hidden, grad_params)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_params = ctx.grads
        ctx.grads = None
        scaled_hidden = grad_hidden * grad_total if grad_hidden is not None else None
        return (scaled_hidden, None, None, None, *[g * grad_total for g in grad_params])


def causal_lm_loss(hidden: torch.Tensor, labels: torch.Tensor, logits_fn: Callable[[torch.Tensor], torch.Tensor],
                   chunk_size: int = DEFAULT_CHUNK_SIZE, params: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Token-mean next-token NLL (see the module docstring) of `hidden` (B, S, H) against `labels` (B, S).

    `logits_fn` maps (..., H) to (..., V) logits. `params`: the parameters it uses; the chunked path computes
    their gradients itself, so they must be named — by default every parameter of `logits_fn` when it is a
    module or a module's method (a plain function closing over trained tensors must pass them).
    `chunk_size` tokens per chunk; 0 = all logits at once.
    """
    targets = shifted_targets(labels).reshape(-1)
    flat = hidden.reshape(-1, hidden.shape[-1])
    count = (targets != -100).sum()
    if chunk_size <= 0:
        return _chunk_nll(logits_fn, flat, targets) / count
    if params is None:
        owner = logits_fn if isinstance(logits_fn, torch.nn.Module) else getattr(logits_fn, "__self__", None)
        params = list(owner.parameters()) if isinstance(owner, torch.nn.Module) else []
    params = [p for p in params if p.requires_grad]
    if torch.is_grad_enabled() and (flat.requires_grad or params):
        return _ChunkedNLL.apply(flat, targets, logits_fn, chunk_size, *params) / count
    total = sum(_chunk_nll(logits_fn, part, part_targets)
                for part, part_targets in zip(flat.split(chunk_size), targets.split(chunk_size)))
    return total / count
