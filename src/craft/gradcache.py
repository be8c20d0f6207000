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
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from craft.errors import UserError
from craft.hooks import last_hidden_state
from craft.losses import InfoNCELoss
from craft.negatives import NegativeQueue


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
                       backward: Callable[[Tensor], None] | None = None, defer_last: bool = False):
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
        defer_last: leave the last chunk's backward to the caller: the return value is then
            ``(output, pending)`` with ``pending`` the last chunk's scalar ``sum(r_K * G_K)`` (re-forwarded, graph
            attached, not yet backpropagated). A trainer hands it to its engine's own backward, which then is the
            synchronising backward of the micro-batch (DDP all-reduce, ZeRO / FSDP reduce-scatter and step).

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
    last, pending = len(chunks) - 1, None
    for index, (chunk, state, grad) in enumerate(zip(chunks, states, grads)):
        state.restore()
        if index == last and defer_last:
            pending = (encode(chunk) * grad).sum()
            continue
        context = no_sync() if (no_sync is not None and index < last) else contextlib.nullcontext()
        with context:
            backward((encode(chunk) * grad).sum())
    after_loss.restore()
    result = type(output)([loss.detach(), *output[1:]]) if isinstance(output, (tuple, list)) else loss.detach()
    return (result, pending) if defer_last else result


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
                          backward: Callable[[Tensor], None] | None = None, defer_last: bool = False):
    """GradCache for a contrastive objective (`craft.objective.ContrastiveObjective`) over an encoder.

    Args:
        encoder: ``encoder(ids [b, T], attention_mask [b, T]) -> (hidden [b, T, H], zero)``, one forward of the
            (wrapped) model; ``zero`` is a 0 tied to whatever the forward used but the hidden states do not
            (the LM head), added so that every used parameter gets a gradient.
        objective: pools (``objective.pool``) and scores (``objective(pooled_anchors, pooled_positives)``).
        anchors, positives: ``(ids [B, T], attention_mask [B, T], pooling mask [B, T])``. When both share the
            same ``ids`` tensor (self-align: prompt vs assistant span of one sequence) each row is encoded once
            and pooled twice; otherwise the anchors' and the positives' rows are chunked one after the other.
        chunk_size, loss_weight, no_sync, backward, defer_last: as in `gradcache_backward`.

    Returns ``(loss, logits, projected anchors)`` of the objective, the loss detached (with ``defer_last``:
    ``((loss, logits, anchors), pending)``). Every parameter's ``.grad`` (model and objective) then holds
    ``loss_weight`` times the full-batch gradient (with ``defer_last``, once ``pending`` is backpropagated).
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

    return gradcache_backward(encode, chunks, loss_fn, loss_weight, no_sync=no_sync, backward=backward,
                              defer_last=defer_last)


# ------------------------------------------------------------------------------ contrastive-ft 0.4.3 names


@dataclass
class GradCacheConfig:
    """Settings of `GradCacheContrastiveLoss`: ``chunk_size`` sequences per re-forward, the InfoNCE
    ``temperature``; ``use_amp`` runs the encoder under ``torch.autocast`` on CUDA; ``sync_gradients=False``
    defers DDP's all-reduce over all chunks but the last (the backbone must then be a DDP module)."""

    chunk_size: int = 4
    temperature: float = 0.05
    use_amp: bool = True
    sync_gradients: bool = True


class GradCacheContrastiveLoss(torch.nn.Module):
    """contrastive-ft 0.4.3's GradCache module over `gradcache_backward`: exact gradients for the backbone, the
    projector and nothing else to do — its forward has already run the backward.

    ``GradCacheContrastiveLoss(backbone, projector, pooling_fn, config=GradCacheConfig())``;
    ``forward(anchor_ids, anchor_mask, positive_ids, positive_mask, return_embeddings=False)`` encodes each side
    in chunks of ``config.chunk_size`` rows (``pooling_fn(last_hidden [b, T, H], mask [b, T]) -> [b, H]``), projects
    and L2-normalises with ``projector``, and computes InfoNCE at ``config.temperature``. In training mode with
    gradients enabled the gradient of that loss is accumulated into ``.grad`` of the backbone and projector
    parameters (to 1e-5 of one full-batch backward); the returned loss is detached, so do not call backward() on
    it (the original returned a loss whose backward reached the projector only: its backbone got no gradient).
    In eval mode or under ``torch.no_grad()`` it only computes the loss. ``return_embeddings`` adds the
    normalised anchor and positive embeddings [B, D] (detached).
    """

    def __init__(self, backbone: torch.nn.Module, projector: torch.nn.Module,
                 pooling_fn: Callable[[Tensor, Tensor], Tensor], config: GradCacheConfig | None = None):
        super().__init__()
        self.backbone, self.projector, self.pooling_fn = backbone, projector, pooling_fn
        self.config = config or GradCacheConfig()
        self.infonce = InfoNCELoss(self.config.temperature)

    def _encode(self, chunk) -> Tensor:
        ids, mask = chunk
        autocast = (torch.autocast("cuda") if self.config.use_amp and ids.is_cuda else contextlib.nullcontext())
        with autocast:
            output = self.backbone(input_ids=ids, attention_mask=mask, use_cache=False, return_dict=True)
            hidden = last_hidden_state(output)
            return self.pooling_fn(hidden, mask)

    def _loss(self, pooled: Tensor, size: int):
        embeddings = F.normalize(self.projector(pooled), dim=-1)
        loss = self.infonce(embeddings[:size], embeddings[size:])
        return loss, embeddings.detach()

    def forward(self, anchor_ids: Tensor, anchor_mask: Tensor, positive_ids: Tensor, positive_mask: Tensor,
                return_embeddings: bool = False):
        size = anchor_ids.shape[0]
        slices = split_into_chunks(size, self.config.chunk_size)
        chunks = [(ids[s], mask[s]) for ids, mask in ((anchor_ids, anchor_mask), (positive_ids, positive_mask))
                  for s in slices]
        if self.training and torch.is_grad_enabled():
            no_sync = getattr(self.backbone, "no_sync", None) if not self.config.sync_gradients else None
            loss, embeddings = gradcache_backward(self._encode, chunks, lambda pooled: self._loss(pooled, size),
                                                  no_sync=no_sync)
        else:
            with torch.no_grad():
                loss, embeddings = self._loss(torch.cat([self._encode(chunk) for chunk in chunks]), size)
        if return_embeddings:
            return loss, embeddings[:size], embeddings[size:]
        return loss


class CachedEmbeddingBank:
    """contrastive-ft 0.4.3's embedding bank, a `craft.negatives.NegativeQueue` of ``bank_size`` entries of
    ``embedding_dim`` on ``device``: ``enqueue`` (detached copies, the oldest dropped), ``get_negatives()``
    ([size, D]; empty [0, D] before any enqueue), ``size``, ``is_full``, ``clear()``."""

    def __init__(self, embedding_dim: int, bank_size: int = 65536, device: torch.device | str | None = None):
        self.embedding_dim, self.bank_size = int(embedding_dim), int(bank_size)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.queue = NegativeQueue(self.bank_size)

    @torch.no_grad()
    def enqueue(self, embeddings: Tensor) -> None:
        if embeddings.shape[-1] != self.embedding_dim:
            raise UserError(f"CachedEmbeddingBank holds {self.embedding_dim}-dim embeddings; got "
                            f"{embeddings.shape[-1]}-dim ones")
        self.queue.enqueue(embeddings.to(self.device))

    def get_negatives(self) -> Tensor:
        negatives = self.queue.negatives()
        return torch.zeros(0, self.embedding_dim, device=self.device) if negatives is None else negatives

    @property
    def size(self) -> int:
        return len(self.queue)

    @property
    def is_full(self) -> bool:
        return len(self.queue) == self.bank_size

    def clear(self) -> None:
        self.queue = NegativeQueue(self.bank_size)


def compute_infonce_with_negatives(anchor: Tensor, positive: Tensor, negatives: Tensor | None = None,
                                   temperature: float = 0.05) -> Tensor:
    """Mean InfoNCE of ``anchor`` [B, D] against ``positive`` [B, D] plus optional ``negatives`` [N, D]
    (`craft.losses.InfoNCELoss` at a fixed ``temperature``)."""
    return InfoNCELoss(temperature)(anchor, positive, negatives=negatives)
