"""Next-token cross-entropy of the last pipeline stage, with or without the full-vocabulary logits in memory.

Shapes: hidden (B, S, H) = the final norm's output; labels (B, S) int64 with -100 = ignored; V = vocabulary.
The target of position t is `labels[:, t+1]` (the last position has none), and the loss is the token mean

    L = sum_{t: target_t != -100} -log softmax(z_t)[target_t]  /  #{t: target_t != -100},

with z_t = head(hidden_t) the logits (lm_head, then Cohere's logit_scale or Gemma 2's softcap, in the model dtype,
then float32 for the softmax) — the value of HF's `ForCausalLMLoss`. With no counted token it is 0/0 = nan, as there.

* `chunk_size = 0`: the plain loss (`F.cross_entropy` on all logits). All B*S*V logits exist at once, in the model
  dtype and again in float32, and the backward pass holds more float32 copies: 12 bytes per logit at the peak in
  float32 and bf16 (6.3 GB at S = 4096 and a 128256-token vocabulary).
* `chunk_size = c > 0`: only the positions that have a target are computed (padding and the last position cost
  nothing), c at a time. In the forward pass each chunk's logits z (c, V) are computed, and with them, in place,
  the gradient of the summed NLL with respect to them,

      lse = m + log sum_v exp(z_v - m)   (m = max_v z_v),   NLL = lse - z_target,
      dNLL/dz = softmax(z) - onehot(target) = exp(z - m) / sum_v exp(z_v - m) - onehot(target),

  which is then pulled back through the head by autograd (lm_head, softcap / logit_scale) to dL/dhidden (c, H) and
  to the head's trained parameters (lm_head for full fine-tuning, a LoRA on lm_head); the chunk's logits are freed
  before the next. The backward pass only multiplies the kept gradients by the incoming one. Kept between the
  passes: dL/dhidden (B*S, H) and the head's parameter gradients. So the working set is one float32 copy of
  c*V logits (plus the model-dtype logits and their gradient below float32) whatever S is; the FLOPs are the plain
  loss's (no recompute), and the memory passes over the logits are 5 in place (max, subtract, exp, sum, divide)
  where `F.cross_entropy`'s log-softmax + NLL forward and backward make ~8 and allocate 3 more copies. The
  gradients are the plain loss's: the same sum, split into chunks, equal within float32 rounding.
  Without gradients (evaluation) the chunks are only summed.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

# 256 tokens x 128256 (Llama 3 vocabulary) x 4 bytes = 131 MB per float32 copy of a chunk's logits: 1/48 of the
# plain loss's 12 bytes per logit at 4096 tokens and 1/384 at 32768, while a (256 x H) @ (H x V) matmul still keeps a
# GPU busy. On CPU, 1024 tokens per chunk ran 2 % faster and 128 8 % slower (1 thread, 1024 tokens, hidden 256).
DEFAULT_CHUNK_SIZE = 256


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """(B, S) -> (B, S): position t's target is labels[:, t+1]; the last position gets -100 (no target)."""
    return F.pad(labels[:, 1:], (0, 1), value=-100)


def _chunk_nll(logits_fn: Callable, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed NLL of one chunk: hidden (n, H), targets (n,) -> scalar float32."""
    return F.cross_entropy(logits_fn(hidden).float(), targets, ignore_index=-100, reduction="sum")


@torch.no_grad()
def nll_and_logit_grad_(logits: torch.Tensor, targets: torch.Tensor, overwrite: bool = True
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL of logits (n, V) against targets (n,) (none ignored), and d(NLL)/d(logits) = softmax - onehot.

    With `overwrite`, float32 logits are overwritten by the gradient (a model-dtype tensor is first copied to
    float32, and the gradient cast back): no (n, V) temporary is allocated. Returns (scalar float32, gradient in
    logits' dtype).
    """
    z = logits.float() if overwrite or logits.dtype != torch.float32 else logits.clone()
    rows = torch.arange(z.shape[0], device=z.device)
    picked = z[rows, targets]
    m = z.amax(dim=1, keepdim=True)
    z.sub_(m).exp_()
    total = z.sum(dim=1, keepdim=True)
    z.div_(total)
    nll = (m.squeeze(1) + total.squeeze(1).log() - picked).sum()
    z[rows, targets] -= 1.0
    return nll, z.to(logits.dtype)


class _ChunkedNLL(torch.autograd.Function):
    """Summed NLL of `hidden` (N, H) at the positions `rows`, chunk by chunk; gradients for `hidden` and `params`
    computed in forward (module docstring)."""

    @staticmethod
    def forward(ctx, hidden, targets, rows, logits_fn, chunk_size, *params):
        grad_hidden = torch.zeros_like(hidden) if hidden.requires_grad else None
        grad_params = [torch.zeros_like(p) for p in params]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for index in rows.split(chunk_size):
            part = hidden.index_select(0, index).requires_grad_(hidden.requires_grad)
            saved = set()  # storages the head's graph keeps for its backward (a head ending in tanh keeps the logits)
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(
                    lambda t: saved.add(t.untyped_storage().data_ptr()) or t, lambda t: t):
                logits = logits_fn(part)
            overwrite = logits.untyped_storage().data_ptr() not in saved
            nll, grad_logits = nll_and_logit_grad_(logits.detach(), targets.index_select(0, index), overwrite)
            inputs = ([part] if hidden.requires_grad else []) + list(params)
            grads = list(torch.autograd.grad(logits, inputs, grad_logits, allow_unused=True))
            del logits, grad_logits
            if hidden.requires_grad:
                grad_hidden.index_copy_(0, index, grads.pop(0))
            for accumulated, grad in zip(grad_params, grads):
                if grad is not None:
                    accumulated += grad
            total += nll
        ctx.grads = (grad_hidden, grad_params)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_params = ctx.grads
        ctx.grads = None  # the kept gradients are ours alone: scaled in place
        scaled_hidden = grad_hidden.mul_(grad_total) if grad_hidden is not None else None
        return (scaled_hidden, None, None, None, None, *[g.mul_(grad_total) for g in grad_params])


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
    counted = targets != -100
    count = counted.sum()
    if chunk_size <= 0:
        return _chunk_nll(logits_fn, flat, targets) / count
    if params is None:
        owner = logits_fn if isinstance(logits_fn, torch.nn.Module) else getattr(logits_fn, "__self__", None)
        params = list(owner.parameters()) if isinstance(owner, torch.nn.Module) else []
    params = [p for p in params if p.requires_grad]
    rows = counted.nonzero().squeeze(1)  # positions without a target need no logits
    if torch.is_grad_enabled() and (flat.requires_grad or params):
        return _ChunkedNLL.apply(flat, targets, rows, logits_fn, chunk_size, *params) / count
    total = sum((_chunk_nll(logits_fn, flat.index_select(0, index), targets.index_select(0, index))
                 for index in rows.split(chunk_size)), torch.zeros((), device=flat.device))
    return total / count
