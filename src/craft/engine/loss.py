"""Next-token cross-entropy of the last pipeline stage, with or without the full-vocabulary logits in memory.

Shapes: hidden (B, S, H) = the final norm's output; labels (B, S) int64 with -100 = ignored; V = vocabulary.
The target of position t is `labels[:, t+1]` (the last position has none), and the loss is the token mean

    L = sum_{t: target_t != -100} -log softmax(z_t)[target_t]  /  #{t: target_t != -100},

with z_t = head(hidden_t) the logits (lm_head, then Cohere's logit_scale or Gemma 2's softcap, in the model dtype,
then float32 for the softmax) — the value of HF's `ForCausalLMLoss`. With no counted token it is 0/0 = nan, as there.

* `chunk_size = 0`: the plain loss. All B*S*V logits exist at once, in the model dtype and again in float32, and the
  backward pass holds a few more float32 copies: about 5 * 4 * B*S*V bytes at the peak (10.9 GiB at S = 4096 and a
  128256-token vocabulary).
* `chunk_size = c > 0`: the B*S positions are cut into chunks of c; each chunk's summed NLL runs under
  `torch.utils.checkpoint` (non-reentrant), so its logits are freed after the forward and recomputed, one chunk at a
  time, in the backward pass. Only the chunk inputs (views of `hidden`) are kept, and the peak working set is the
  same few copies of c*V logits whatever S is. Gradients for `hidden` and for the head's weights (full fine-tuning,
  or a LoRA on lm_head) are those of the plain loss: the same sum, split into chunks.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

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


def causal_lm_loss(hidden: torch.Tensor, labels: torch.Tensor, logits_fn: Callable[[torch.Tensor], torch.Tensor],
                   chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """Token-mean next-token NLL (see the module docstring) of `hidden` (B, S, H) against `labels` (B, S).

    `logits_fn` maps (..., H) to (..., V) logits. `chunk_size` tokens per chunk; 0 = all logits at once.
    """
    targets = shifted_targets(labels).reshape(-1)
    flat = hidden.reshape(-1, hidden.shape[-1])
    count = (targets != -100).sum()
    if chunk_size <= 0:
        return _chunk_nll(logits_fn, flat, targets) / count
    total = None
    for part, part_targets in zip(flat.split(chunk_size), targets.split(chunk_size)):
        nll = checkpoint(_chunk_nll, logits_fn, part, part_targets, use_reentrant=False)
        total = nll if total is None else total + nll
    return total / count
