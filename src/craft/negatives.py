"""MoCo-style negative queue (He et al., 2020): a FIFO of past projected embeddings used as extra negatives.

With ``craft_negative_strategy="queue"`` every contrastive loss scores each anchor against the batch's positives
AND the ``N <= craft_negative_queue_size`` most recent positives of earlier batches (see `InfoNCELoss`, whose
``negatives`` argument takes them). The queue stores detached copies: no gradient flows into past batches.

Two rules keep autograd safe (the original implementation broke the second one and crashed on backward):

* `negatives` returns a tensor that the queue never writes to afterwards, and
* `enqueue` runs AFTER the loss is computed and writes out of place (it builds a new buffer), so a tensor saved
  for backward by the loss is never modified — the backward after an enqueue sees exactly what the forward saw.

The storage is a ring buffer ``[capacity, D]``; ``state_dict()`` holds the entries oldest-first, so a saved and
restored queue hands out the same negatives.
"""

from __future__ import annotations

import torch
from torch import Tensor

from craft.errors import UserError


class NegativeQueue:
    """FIFO of at most ``capacity`` embeddings of dimension D.

    ::

        queue = NegativeQueue(capacity=4096)
        loss = infonce(anchors, positives, negatives=queue.negatives())   # None while the queue is empty
        queue.enqueue(positives)                                           # after the loss: detached copies
        loss.backward()                                                    # safe: nothing saved was modified
    """

    def __init__(self, capacity: int):
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity <= 0:
            raise UserError(f"craft_negative_queue_size must be a positive integer; got {capacity!r}")
        self.capacity = capacity
        self._buffer: Tensor | None = None  # [capacity, D]; row `_next` is the next to overwrite
        self._next = 0
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @property
    def dim(self) -> int | None:
        """D, fixed by the first enqueue (None before)."""
        return None if self._buffer is None else int(self._buffer.shape[1])

    def negatives(self) -> Tensor | None:
        """The queued embeddings ``[len(self), D]`` (None when empty). Later enqueues never modify this tensor."""
        if self._count == 0:
            return None
        return self._buffer[: self._count] if self._count < self.capacity else self._buffer

    def enqueue(self, embeddings: Tensor) -> None:
        """Append detached copies of ``embeddings`` [b, D], dropping the oldest entries beyond ``capacity``."""
        if embeddings.dim() != 2:
            raise ValueError(f"the negative queue takes embeddings of shape [batch, dim]; got {tuple(embeddings.shape)}")
        new = embeddings.detach()[-self.capacity:]
        if self._buffer is None:
            self._buffer = new.new_zeros(self.capacity, new.shape[1])
        elif new.shape[1] != self._buffer.shape[1]:
            raise UserError(f"the negative queue holds {self._buffer.shape[1]}-dim embeddings; got {new.shape[1]}-dim "
                            "ones (craft_projection_dim changed?)")
        rows = (self._next + torch.arange(new.shape[0], device=self._buffer.device)) % self.capacity
        # index_copy (out of place) builds a new buffer: tensors handed out by `negatives()` keep their values.
        self._buffer = self._buffer.index_copy(0, rows, new.to(self._buffer))
        self._next = (self._next + new.shape[0]) % self.capacity
        self._count = min(self.capacity, self._count + new.shape[0])

    def ordered(self) -> Tensor | None:
        """The entries oldest-first ``[len(self), D]`` (a copy), None when empty."""
        if self._count == 0:
            return None
        start = (self._next - self._count) % self.capacity
        index = (start + torch.arange(self._count, device=self._buffer.device)) % self.capacity
        return self._buffer.index_select(0, index)

    def state_dict(self) -> dict:
        """``{"capacity", "entries"}`` with ``entries`` the embeddings oldest-first on the CPU (None when empty)."""
        entries = self.ordered()
        return {"capacity": self.capacity, "entries": None if entries is None else entries.cpu()}

    def load_state_dict(self, state: dict, device: torch.device | str | None = None) -> None:
        """Restore a `state_dict()`; the entries go to ``device`` (default: where they are)."""
        if int(state["capacity"]) != self.capacity:
            raise UserError(f"the saved negative queue has capacity {state['capacity']}, this run's "
                            f"craft_negative_queue_size is {self.capacity}; use the same size to resume")
        self._buffer, self._next, self._count = None, 0, 0
        if state["entries"] is not None:
            entries = state["entries"]
            self.enqueue(entries.to(device) if device is not None else entries)


# ------------------------------------------------------------------------------------- negatives across ranks


def distributed_world() -> int:
    """The number of ranks of the default process group (1 without one)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GatherWithGradient(torch.autograd.Function):
    """All-gather of ``x`` [b, D] from every rank -> [W, b, D], whose backward sums the incoming gradient over the
    ranks and returns this rank's slice.

    Rank r's loss L_r uses every rank's rows, so the gradient of Σ_r L_r for this rank's rows x_s is
    Σ_r ∂L_r/∂x_s: the all-reduce (sum) of the per-rank gradients of the gathered tensor, sliced at s. gloo has
    no reduce-scatter, hence the all-reduce.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        dist = torch.distributed
        ctx.rank = dist.get_rank()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad)
        return grad[ctx.rank]


def gather_negatives(local: Tensor) -> tuple[Tensor, Tensor]:
    """Every rank's rows of ``local`` [b, D] (same b on every rank), for use as negatives.

    Returns ``(others, everyone)``: ``others`` [(W-1)·b, D] are the other ranks' rows in rank order, carrying the
    gradient back to the rank that produced them (see `_GatherWithGradient`); ``everyone`` [W·b, D] is every
    rank's rows in rank order, detached (what the queue enqueues, identical on every rank). A rank's own rows are
    not in ``others``: the caller keeps its local tensor (and its direct gradient path) first.
    """
    sizes = torch.tensor([local.shape[0]], device=local.device)
    all_sizes = [torch.empty_like(sizes) for _ in range(distributed_world())]
    torch.distributed.all_gather(all_sizes, sizes)
    if len({int(s) for s in all_sizes}) != 1:
        raise UserError("craft_gather_negatives needs the same contrastive batch size on every rank; got "
                        f"{[int(s) for s in all_sizes]} (use dataloader_drop_last=True or a dataset size divisible "
                        "by world size x batch size)")
    gathered = _GatherWithGradient.apply(local)
    rank = torch.distributed.get_rank()
    others = torch.cat([gathered[r] for r in range(gathered.shape[0]) if r != rank])
    return others, gathered.detach().flatten(0, 1)
