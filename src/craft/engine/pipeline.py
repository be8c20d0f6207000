"""The causal LM as a DeepSpeed `PipelineModule`: embedding, one item per decoder layer, head, loss.

Activations between items are the tuple `(hidden_states, control_classes, attention_mask)`:
  hidden_states   (batch, seq, hidden) in the model dtype
  control_classes (batch, seq) int64; position t carries the class of token t+1 (aligned with the labels)
  attention_mask  (batch, seq) int64; 1 for real tokens, 0 for padding (which the class-0 aux loss ignores)
Integer tensors carry no gradient, which DeepSpeed's pipeline engine accepts on any stage.

Per item:
* embedding — `embed_tokens(input_ids)` (Gemma 2's embedding module multiplies by sqrt(hidden) itself);
* decoder layer i — position ids `0..seq-1`, rotary (cos, sin) from the model's rotary module, the causal mask
  the HF model would build for this layer (sliding window where the config's `layer_types[i]` or
  `sliding_window` says so), the layer's own forward; with Control Adapters the layer first receives the
  micro-batch's classes and its auxiliary (class-0) loss is attached to the output with `AttachAuxLoss`;
* head — the final norm, returning normed hidden states (batch, seq, hidden); `HeadPipe.logits` applies
  `lm_head`, then Cohere's `logit_scale` or Gemma 2's final logit softcapping `cap * tanh(logits / cap)`;
* loss — `craft.engine.loss.causal_lm_loss`: token-mean next-token cross entropy in float32, ignoring -100 (HF's
  `ForCausalLMLoss`), over chunks of `chunk_size` tokens, each chunk's logits freed before the next (0 = all at
  once).

Activation checkpointing (`checkpointing`): True runs each decoder layer under `torch.utils.checkpoint`
(non-reentrant), so a layer keeps only its inputs `(hidden, classes, mask)` and recomputes the rest in backward;
"offload" also moves those saved inputs to CPU memory (`torch.autograd.graph.save_on_cpu`: pinned and
non-blocking on CUDA, a plain copy on CPU) and brings them back for the recompute. Everything a layer needs is
an input of the checkpointed function — the classes are set on the adapters inside it, so a recompute that runs
after other micro-batches' forwards still sees its own — and the default RNG replay gives dropout the same masks.
The aux loss is an output of the checkpointed function: it is counted (and attached) once, outside, and the
recompute's copy is dropped.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from craft.engine.loss import DEFAULT_CHUNK_SIZE, causal_lm_loss
from craft.engine.model import StageModel


class AttachAuxLoss(torch.autograd.Function):
    """`forward(h, aux) = h`; backward passes h's gradient through and gives `aux` the gradient `scale`.

    So the auxiliary loss of any stage contributes `scale * d(aux)/d(params)` during the pipeline's ordinary
    backward pass, without travelling to the last stage. `scale` is 1 / (gradient accumulation steps), the
    same factor DeepSpeed applies to the main loss of each micro-batch.
    """

    @staticmethod
    def forward(ctx, hidden, aux, scale):
        ctx.scale = scale
        ctx.aux_dtype = aux.dtype
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad_hidden):
        return grad_hidden, torch.full((), ctx.scale, dtype=ctx.aux_dtype, device=grad_hidden.device), None


class AuxLossMeter:
    """Settings and running sum of the auxiliary (class-0) loss on one stage.

    The model's aux loss is the mean over all `num_adapters` adapters of the model (all stages), so each layer
    contributes `control_aux_loss(layer, "sum") / num_adapters`; `scale` = 1 / accumulation steps.
    """

    def __init__(self, scale: float, num_adapters: int):
        self.scale, self.num_adapters, self.total = scale, max(1, num_adapters), 0.0

    def pop(self) -> float:
        total, self.total = self.total, 0.0
        return total


@functools.cache
def _cache_keyword(build) -> str:
    """transformers renamed the mask builders' `past_key_values` to `cache` (5.2x); the old name warns."""
    return "cache" if "cache" in inspect.signature(build).parameters else "past_key_values"


def causal_mask_for(hf_config, layer_index: int, hidden: torch.Tensor, position_ids: torch.Tensor):
    """The attention mask HF builds for decoder layer `layer_index` (None when the kernel is causal by itself)."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types is not None:
        sliding = layer_types[layer_index] == "sliding_attention"
    else:
        sliding = getattr(hf_config, "sliding_window", None) is not None
    build = create_sliding_window_causal_mask if sliding else create_causal_mask
    return build(config=hf_config, inputs_embeds=hidden, attention_mask=None, position_ids=position_ids,
                 **{_cache_keyword(build): None})


class EmbeddingPipe(nn.Module):
    def __init__(self, stage: StageModel):
        super().__init__()
        self.embed_tokens = stage.base.model.embed_tokens

    def forward(self, inputs):
        input_ids, control_classes, attention_mask = inputs
        return self.embed_tokens(input_ids), control_classes, attention_mask


class DecoderLayerPipe(nn.Module):
    def __init__(self, stage: StageModel, layer_index: int, aux_meter: AuxLossMeter | None,
                 checkpointing: bool | str = False):
        super().__init__()
        self.layer = stage.base.model.layers[layer_index]
        self.layer_index = layer_index
        self.hf_config = stage.hf_config
        self.rotary = stage.rotary
        # cos/sin depend only on (positions, dtype, device): shared by every layer of the stage and computed once
        # per shape. Recomputing them in each layer, as a per-layer pipeline module naively would, cost ~8 % of a
        # step on a small model; HF itself computes them once per forward.
        self.rotary_cache = stage.rotary_cache
        self.control = stage.mode == "control"
        self.aux_meter = aux_meter
        self.checkpointing = checkpointing

    def forward(self, inputs):
        hidden, control_classes, attention_mask = inputs
        if self.checkpointing and self.training and torch.is_grad_enabled():
            offload = torch.autograd.graph.save_on_cpu(pin_memory=True) if self.checkpointing == "offload" \
                else contextlib.nullcontext()
            with offload:
                out, aux = checkpoint(self._layer, hidden, control_classes, attention_mask, use_reentrant=False)
        else:
            out, aux = self._layer(hidden, control_classes, attention_mask)
        if aux is not None:
            self.aux_meter.total += float(aux.detach())
            out = AttachAuxLoss.apply(out, aux, self.aux_meter.scale)
        return out, control_classes, attention_mask

    def _layer(self, hidden, control_classes, attention_mask):
        """The decoder layer on (B, S, H): (output (B, S, H), this layer's aux loss or None)."""
        batch, seq = hidden.shape[:2]
        position_ids = torch.arange(seq, device=hidden.device).unsqueeze(0).expand(batch, -1)
        mask = causal_mask_for(self.hf_config, self.layer_index, hidden, position_ids)
        position_embeddings = self._rotary(hidden, position_ids)
        if self.control:
            from craft.adapters import set_control_classes

            set_control_classes(self.layer, control_classes, token_mask=attention_mask)
        out = self.layer(hidden, attention_mask=mask, position_ids=position_ids,
                         position_embeddings=position_embeddings, use_cache=False)
        if isinstance(out, tuple):
            out = out[0]
        aux = None
        if self.control and self.aux_meter is not None and self.training:
            aux = self._aux_loss()
        return out, aux

    def _rotary(self, hidden, position_ids):
        key = (tuple(position_ids.shape), hidden.dtype, hidden.device)
        if key not in self.rotary_cache:
            with torch.no_grad():
                self.rotary_cache[key] = self.rotary(hidden, position_ids)
        return self.rotary_cache[key]

    def _aux_loss(self):
        """This layer's share of the model's aux loss, or None when it has no gradient (no neutral token)."""
        from craft.adapters import control_aux_loss

        aux = control_aux_loss(self.layer, reduction="sum") / self.aux_meter.num_adapters
        return aux if aux.requires_grad else None


class HeadLoss:
    """The pipeline's `loss_fn(normed_hidden, labels)`: `causal_lm_loss` through `head.logits`, chunked.

    A plain object, not a module: the head's parameters belong to the `HeadPipe` item that owns them.
    """

    def __init__(self, chunk_size: int = DEFAULT_CHUNK_SIZE):
        self.head, self.chunk_size = None, chunk_size

    def __call__(self, normed: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return causal_lm_loss(normed, labels, self.head.logits, self.chunk_size, self.head.lm_head.parameters())


class HeadPipe(nn.Module):
    def __init__(self, stage: StageModel, loss: HeadLoss | None = None):
        super().__init__()
        if loss is not None:
            loss.head = self  # the loss runs through this head's lm_head; built on the last stage only
        self.norm = stage.base.model.norm
        self.lm_head = stage.base.lm_head
        self.logit_scale = getattr(stage.hf_config, "logit_scale", None)
        self.softcap = getattr(stage.hf_config, "final_logit_softcapping", None)

    def forward(self, inputs):
        return self.norm(inputs[0])

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        """(..., H) normed hidden states -> (..., V) logits in the model dtype."""
        logits = self.lm_head(normed)
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def pipeline_items(stage: StageModel, aux_meter: AuxLossMeter | None, loss: HeadLoss | None = None,
                   checkpointing: bool | str = False) -> list:
    """All N + 2 items as DeepSpeed `LayerSpec`s (only this stage's are ever built), in pipeline order."""
    from deepspeed.pipe import LayerSpec

    items = [LayerSpec(EmbeddingPipe, stage)]
    items += [LayerSpec(DecoderLayerPipe, stage, i, aux_meter, checkpointing) for i in range(stage.num_layers)]
    items.append(LayerSpec(HeadPipe, stage, loss))
    return items


def build_pipeline_module(stage: StageModel, num_stages: int, topology=None, aux_meter: AuxLossMeter | None = None,
                          seed: int = 42, checkpointing: bool | str = True, chunk_size: int = DEFAULT_CHUNK_SIZE):
    """A `PipelineModule` over the model's items, partitioned as `pipeline_parts` (uniform) says.

    Checkpointing is done per decoder layer by `DecoderLayerPipe` (DeepSpeed's own `activation_checkpoint_interval`
    stays 0: it would checkpoint whole runs of items with the reentrant function and could not offload)."""
    from deepspeed.pipe import PipelineModule

    loss = HeadLoss(chunk_size)
    kwargs = {"topology": topology} if topology is not None else {"num_stages": num_stages}
    return PipelineModule(layers=pipeline_items(stage, aux_meter, loss, checkpointing), loss_fn=loss,
                          partition_method="uniform", base_seed=seed, activation_checkpoint_interval=0, **kwargs)


def stage_items(stage: StageModel, aux_meter: AuxLossMeter | None = None, checkpointing: bool | str = False):
    """(embedding, decoder layers..., head) built in one process (the stage must own all items), for tests and
    benchmarks that run the pipeline's items without DeepSpeed."""
    layers = [DecoderLayerPipe(stage, i, aux_meter, checkpointing) for i in range(stage.num_layers)]
    return EmbeddingPipe(stage), layers, HeadPipe(stage)


def sequential_forward(stage: StageModel, input_ids: torch.Tensor, control_classes: torch.Tensor | None = None,
                       aux_meter: AuxLossMeter | None = None, checkpointing: bool | str = False):
    """Run every item in one process: normed hidden states (B, S, H) and the head (for `head.logits`)."""
    if control_classes is None:
        control_classes = torch.ones_like(input_ids)
    embedding, layers, head = stage_items(stage, aux_meter, checkpointing)
    for item in (embedding, *layers):
        item.train(stage.base.training)
    activations = embedding((input_ids, control_classes, torch.ones_like(input_ids)))
    for layer in layers:
        activations = layer(activations)
    return head(activations), head


def sequential_logits(stage: StageModel, input_ids: torch.Tensor, control_classes: torch.Tensor | None = None,
                      aux_meter: AuxLossMeter | None = None) -> torch.Tensor:
    """Logits (B, S, V) of every item run in one process, for testing against HF."""
    normed, head = sequential_forward(stage, input_ids, control_classes, aux_meter)
    return head.logits(normed)


def sequential_loss(stage: StageModel, input_ids: torch.Tensor, labels: torch.Tensor,
                    control_classes: torch.Tensor | None = None, aux_meter: AuxLossMeter | None = None,
                    checkpointing: bool | str = False, chunk_size: int = 0) -> torch.Tensor:
    """The pipeline's training loss of one micro-batch, every item run in one process."""
    normed, head = sequential_forward(stage, input_ids, control_classes, aux_meter, checkpointing)
    return causal_lm_loss(normed, labels, head.logits, chunk_size, head.lm_head.parameters())
