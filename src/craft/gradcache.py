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
                       no_sync: Callable[[], contextlib.AbstractContextManager] | None = None):
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
    (loss * loss_weight).backward()
    after_loss = RNGState()
    grads = representations.grad.split([r.shape[0] for r in cached])
    del cached, representations
    last = len(chunks) - 1
    for index, (chunk, state, grad) in enumerate(zip(chunks, states, grads)):
        state.restore()
        context = no_sync() if (no_sync is not None and index < last) else contextlib.nullcontext()
        with context:
            torch.autograd.backward(encode(chunk), grad)
    after_loss.restore()
    if isinstance(output, (tuple, list)):
        return type(output)([loss.detach(), *output[1:]])
    return loss.detach()


# ---------------------------------------------------------------------------------------- CRAFT trainers


def _trim_right_padding(*tensors: Tensor, mask: Tensor) -> tuple[Tensor, ...]:
    """Drop the trailing columns where ``mask`` [b, T] is 0 in every row (right padding of a chunk).

    Causal attention makes the real tokens blind to later positions, so their hidden states do not change.
    """
    keep = int(mask.ne(0).any(dim=0).nonzero().max()) + 1 if bool(mask.ne(0).any()) else mask.shape[1]
    return tuple(t[:, :keep] for t in tensors)


def contrastive_gradcache_loss(trainer, model, batch) -> Tensor:
    """A CRAFT trainer's contrastive micro-batch through GradCache; returns the tensor the Trainer backpropagates.

    Paired: the anchors (``input_ids``) and the positives (``input_ids_tgt``) are cut into chunks of
    ``craft_gradcache_chunk_size`` sequences, each encoded to its pooled last hidden state [b, H]; the
    projection head, InfoNCE (with queue negatives) and the metrics run once over all of them. Self-align: each
    chunk of rows is encoded once and pooled over the prompt and over the assistant span, [b, 2, H].

    `gradcache_backward` backpropagates ``w_con · λ_con · InfoNCE`` (the trainer's scaler weight) itself, with
    DDP synchronisation deferred to the last chunk. The returned tensor has that weighted value; its backward
    adds only uncertainty balancing's ``w_con · s_con`` term (for the other strategies it is a fresh leaf whose
    backward changes no parameter).
    """
    modules = trainer.craft_modules
    chunk_size = trainer.args.craft_gradcache_chunk_size

    def hidden_of(ids, mask):
        """The last hidden state [b, T, H] and a zero tied to the logits (the LM head's zero gradient for DDP)."""
        return trainer._forward_hidden(model, ids, mask)

    def project(pooled):
        return modules.projection(pooled.to(modules.projection.fc1.weight.dtype))

    if trainer.craft_self_align:
        anchor_mask, positive_mask = trainer._self_align_masks(batch)
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        chunks = [(ids[s], mask[s], anchor_mask[s], positive_mask[s]) for s in split_into_chunks(ids.shape[0], chunk_size)]

        def encode(chunk):
            ids, mask, anchors, positives = _trim_right_padding(*chunk, mask=chunk[1])
            hidden, zero = hidden_of(ids, mask)
            pooled = [modules.infonce.pool(hidden, anchors), modules.infonce.pool(hidden, positives)]
            return torch.stack(pooled, 1) + zero

        def loss_fn(pooled):
            emb = project(pooled.flatten(0, 1)).unflatten(0, (pooled.shape[0], 2))
            return trainer._infonce(emb[:, 0], emb[:, 1])
    else:
        from craft.trainers import _ids_and_mask

        sides = [_ids_and_mask(batch, ""), _ids_and_mask(batch, "_tgt")]
        size = sides[0][0].shape[0]
        chunks = [(ids[s], mask[s]) for ids, mask in sides for s in split_into_chunks(size, chunk_size)]

        def encode(chunk):
            ids, mask = _trim_right_padding(*chunk, mask=chunk[1])
            hidden, zero = hidden_of(ids, mask)
            return modules.infonce.pool(hidden, mask) + zero

        def loss_fn(pooled):
            emb = project(pooled)
            return trainer._infonce(emb[:size], emb[size:])

    scaler = trainer._craft_scaler
    weight = scaler.contrastive_weight()
    loss, _, _ = gradcache_backward(encode, chunks, loss_fn, weight,
                                    no_sync=lambda: trainer.accelerator.no_sync(model))
    value = (weight * loss).detach().float()
    regularizer = scaler.contrastive_regularizer()
    if regularizer is None:
        return value.clone().requires_grad_(True)
    return regularizer + (value - regularizer.detach())
