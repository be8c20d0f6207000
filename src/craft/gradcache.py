"""GradCache (Gao et al., 2021): exact contrastive gradients for a large batch with the activation memory of a chunk.

A contrastive loss couples every row of the batch (each anchor is scored against every positive), so the
ordinary backward needs the activations of all rows at once. GradCache splits the encoder from the loss:

1. **Embed without a graph.** The rows are split into chunks ``x_1..x_K``; each chunk is encoded under
   ``torch.no_grad()``, ``r_k = f(x_k)`` ([b_k, H]), after recording the random-number state (CPU and CUDA
   generators) it starts from.
2. **Loss and its gradient with respect to the representations.** ``R = cat(r_1..r_K)`` ([B, H]) becomes a leaf
   that requires grad; ``L = loss_fn(R)`` is computed WITH its graph — the projection head, the temperature and
   any extra negatives are inside ``loss_fn`` — and ``(w · L).backward()`` gives the head and temperature their
   exact gradients and caches ``G = dL_w/dR`` ([B, H]), where ``w`` is the loss weight (the accumulator's
   contrastive-term weight times any balancing weight).
3. **Re-forward with a graph, chunk by chunk.** For each chunk the recorded RNG state is restored (dropout masks
   are the same as in step 1), ``r_k = f(x_k)`` is recomputed with grad and
   ``torch.autograd.backward(r_k, G_k)`` adds ``(dL_w/dr_k) · (dr_k/dθ)`` to the encoder's ``.grad``.

By the chain rule, the summed gradients equal those of ``w · loss_fn(cat(f(x_1), ..., f(x_K)))`` computed with one
graph over all chunks (same dropout masks), while at most one chunk's activations are alive at a time. The RNG
is left where the single-graph computation would leave it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from craft.errors import UserError


class RNGState:
    """The CPU generator state and, when CUDA is in use, every CUDA device's generator state.

    ``RNGState()`` records the current states; ``restore()`` puts them back, so that code run after it draws the
    same random numbers (dropout masks) as code run after the recording.
    """

    def __init__(self):
        self.cpu = torch.get_rng_state()
        cuda_in_use = torch.cuda.is_available() and torch.cuda.is_initialized()
        self.cuda = torch.cuda.get_rng_state_all() if cuda_in_use else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def split_into_chunks(num_rows: int, chunk_size: int) -> list[slice]:
    """Row slices ``[0:c], [c:2c], ...`` covering ``num_rows`` rows, each at most ``chunk_size`` rows."""
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
        raise UserError(f"craft_gradcache_chunk_size must be a positive integer; got {chunk_size!r}")
    return [slice(start, min(start + chunk_size, num_rows)) for start in range(0, num_rows, chunk_size)]


def _loss_of(output) -> Tensor:
    loss = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        raise ValueError("GradCache loss_fn must return a scalar loss tensor, or a tuple whose first entry is one")
    return loss


def gradcache_backward(encode: Callable[[Any], Tensor], chunks: Sequence[Any], loss_fn: Callable[[Tensor], Any],
                       loss_weight: float | Tensor = 1.0,
                       no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
                       backward: Callable[[Tensor], None] | None = None):
    """Accumulate into ``.grad`` the gradient of ``loss_weight * loss_fn(cat([encode(c) for c in chunks]))``.

    Args:
        encode: maps one chunk to its representations ``[b_k, H]`` (e.g. model forward + pooling). It runs twice
            per chunk, first without a graph, then with one, from the same RNG state.
        chunks: the chunk inputs, in row order (anything ``encode`` accepts).
        loss_fn: maps the concatenated representations ``[B, H]`` to the loss (a scalar), or to a tuple whose
            first entry is the loss (the rest, e.g. logits, is returned as is). Its graph is kept: parameters it
            uses (projection head, temperature) get their gradient directly.
        loss_weight: ``w``, a float or a scalar tensor (a differentiable weight such as ``exp(-s)`` also gets its
            gradient ``loss * dw``).
        no_sync: a context-manager factory under which every chunk's backward but the last one runs (DDP's
            ``no_sync``: gradients are all-reduced once, after the last chunk).
        backward: runs the backward of a scalar (default ``Tensor.backward``); an engine's own backward
            (DeepSpeed's, which reduces and partitions gradients in its hooks) goes here. A chunk's re-forward
            ``r_k`` is backpropagated as the scalar ``sum(r_k * G_k)``, whose gradient is the same.

    Returns:
        ``loss_fn``'s output with the loss detached. ``.grad`` of every parameter is increased in place; nothing
        needs a further ``backward()``.
    """
    if len(chunks) == 0:
        raise ValueError("GradCache needs at least one chunk")
    states, cached = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(RNGState())
            cached.append(encode(chunk))
    representations = torch.cat(cached).detach().requires_grad_(True)
    output = loss_fn(representations)
    loss = _loss_of(output)
    backward = backward if backward is not None else Tensor.backward
    backward(loss * loss_weight)
    after_loss = RNGState()
    grads = representations.grad.split([r.shape[0] for r in cached])
    del cached, representations
    last = len(chunks) - 1
    for index, (chunk, state, grad) in enumerate(zip(chunks, states, grads)):
        state.restore()
        context = no_sync() if (no_sync is not None and index < last) else contextlib.nullcontext()
        with context:
            backward((encode(chunk) * grad).sum())
    after_loss.restore()
    if isinstance(output, (tuple, list)):
        return type(output)([loss.detach(), *output[1:]])
    return loss.detach()


# ------------------------------------------------------------------------------------ contrastive objective


def _trim_right_padding(*tensors: Tensor, mask: Tensor) -> tuple[Tensor, ...]:
    """Drop the trailing columns where ``mask`` [b, T] is 0 in every row (right padding of a chunk).

    Causal attention makes the real tokens blind to later positions, so their hidden states do not change.
    """
    keep = int(mask.ne(0).any(dim=0).nonzero().max()) + 1 if bool(mask.ne(0).any()) else mask.shape[1]
    return tuple(t[:, :keep] for t in tensors)


def contrastive_gradcache(encoder: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], objective,
                          anchors: tuple[Tensor, Tensor, Tensor], positives: tuple[Tensor, Tensor, Tensor],
                          chunk_size: int, loss_weight: float | Tensor = 1.0,
                          no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
                          backward: Callable[[Tensor], None] | None = None):
    """GradCache for a contrastive objective (`craft.objective.ContrastiveObjective`) over an encoder.

    Args:
        encoder: ``encoder(ids [b, T], attention_mask [b, T]) -> (hidden [b, T, H], zero)``, one forward of the
            (wrapped) model; ``zero`` is a 0 tied to whatever the forward used but the hidden states do not
            (the LM head), added so that every used parameter gets a gradient.
        objective: pools (``objective.pool``) and scores (``objective(pooled_anchors, pooled_positives)``).
        anchors, positives: ``(ids [B, T], attention_mask [B, T], pooling mask [B, T])``. When both share the
            same ``ids`` tensor (self-align: prompt vs assistant span of one sequence) each row is encoded once
            and pooled twice; otherwise the anchors' and the positives' rows are chunked one after the other.
        chunk_size, loss_weight, no_sync, backward: as in `gradcache_backward`.

    Returns ``(loss, logits, projected anchors)`` of the objective, the loss detached. Every parameter's
    ``.grad`` (model and objective) holds ``loss_weight`` times the full-batch gradient.
    """
    size = anchors[0].shape[0]
    shared = positives[0] is anchors[0]
    if shared:
        ids, mask, anchor_pool, positive_pool = anchors[0], anchors[1], anchors[2], positives[2]
        chunks = [(ids[s], mask[s], anchor_pool[s], positive_pool[s]) for s in split_into_chunks(size, chunk_size)]
    else:
        chunks = [(ids[s], mask[s], pool[s]) for ids, mask, pool in (anchors, positives)
                  for s in split_into_chunks(size, chunk_size)]

    def encode(chunk):
        ids, mask, *pools = _trim_right_padding(*chunk, mask=chunk[1])
        hidden, zero = encoder(ids, mask)
        return torch.stack([objective.pool(hidden, pool) for pool in pools], 1) + zero  # [b, views, H]

    def loss_fn(pooled):
        if shared:
            return objective(pooled[:, 0], pooled[:, 1])
        return objective(pooled[:size, 0], pooled[size:, 0])

    return gradcache_backward(encode, chunks, loss_fn, loss_weight, no_sync=no_sync, backward=backward)
