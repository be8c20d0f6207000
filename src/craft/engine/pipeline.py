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
* head — final norm, `lm_head`, then Cohere's `logit_scale` or Gemma 2's final logit softcapping
  `cap * tanh(logits / cap)`, returning logits (batch, seq, vocab);
* loss — token-mean cross entropy of `logits[:, :-1]` against `labels[:, 1:]` in float32, ignoring -100:
  the loss of HF's `ForCausalLMLoss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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


def causal_mask_for(hf_config, layer_index: int, hidden: torch.Tensor, position_ids: torch.Tensor):
    """The attention mask HF builds for decoder layer `layer_index` (None when the kernel is causal by itself)."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types is not None:
        sliding = layer_types[layer_index] == "sliding_attention"
    else:
        sliding = getattr(hf_config, "sliding_window", None) is not None
    build = create_sliding_window_causal_mask if sliding else create_causal_mask
    return build(config=hf_config, inputs_embeds=hidden, attention_mask=None, past_key_values=None,
                 position_ids=position_ids)


class EmbeddingPipe(nn.Module):
    def __init__(self, stage: StageModel):
        super().__init__()
        self.embed_tokens = stage.base.model.embed_tokens

    def forward(self, inputs):
        input_ids, control_classes, attention_mask = inputs
        return self.embed_tokens(input_ids), control_classes, attention_mask


class DecoderLayerPipe(nn.Module):
    def __init__(self, stage: StageModel, layer_index: int, aux_meter: AuxLossMeter | None):
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

    def forward(self, inputs):
        hidden, control_classes, attention_mask = inputs
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
        if self.control and self.aux_meter is not None and self.training:
            out = self._attach_aux(out)
        return out, control_classes, attention_mask

    def _rotary(self, hidden, position_ids):
        key = (tuple(position_ids.shape), hidden.dtype, hidden.device)
        if key not in self.rotary_cache:
            with torch.no_grad():
                self.rotary_cache[key] = self.rotary(hidden, position_ids)
        return self.rotary_cache[key]

    def _attach_aux(self, out):
        from craft.adapters import control_aux_loss

        aux = control_aux_loss(self.layer, reduction="sum") / self.aux_meter.num_adapters
        if not aux.requires_grad:
            return out
        self.aux_meter.total += float(aux.detach())
        return AttachAuxLoss.apply(out, aux, self.aux_meter.scale)


class HeadPipe(nn.Module):
    def __init__(self, stage: StageModel):
        super().__init__()
        self.norm = stage.base.model.norm
        self.lm_head = stage.base.lm_head
        self.logit_scale = getattr(stage.hf_config, "logit_scale", None)
        self.softcap = getattr(stage.hf_config, "final_logit_softcapping", None)

    def forward(self, inputs):
        hidden = inputs[0]
        logits = self.lm_head(self.norm(hidden))
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL of next-token prediction: logits[:, t] scores labels[:, t+1]; -100 labels are ignored."""
    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=-100)


def pipeline_items(stage: StageModel, aux_meter: AuxLossMeter | None) -> list:
    """All N + 2 items as DeepSpeed `LayerSpec`s (only this stage's are ever built), in pipeline order."""
    from deepspeed.pipe import LayerSpec

    items = [LayerSpec(EmbeddingPipe, stage)]
    items += [LayerSpec(DecoderLayerPipe, stage, i, aux_meter) for i in range(stage.num_layers)]
    items.append(LayerSpec(HeadPipe, stage))
    return items


def build_pipeline_module(stage: StageModel, num_stages: int, topology=None, aux_meter: AuxLossMeter | None = None,
                          seed: int = 42):
    """A `PipelineModule` over the model's items, partitioned as `pipeline_parts` (uniform) says."""
    from deepspeed.pipe import PipelineModule

    kwargs = {"topology": topology} if topology is not None else {"num_stages": num_stages}
    return PipelineModule(layers=pipeline_items(stage, aux_meter), loss_fn=causal_lm_loss,
                          partition_method="uniform", base_seed=seed, activation_checkpoint_interval=0, **kwargs)


def sequential_forward(stage: StageModel, input_ids: torch.Tensor, control_classes: torch.Tensor | None = None,
                       aux_meter: AuxLossMeter | None = None):
    """Run every item in one process (the stage must own all items): logits, for testing against HF."""
    if control_classes is None:
        control_classes = torch.ones_like(input_ids)
    items = [EmbeddingPipe(stage)] + [DecoderLayerPipe(stage, i, aux_meter) for i in range(stage.num_layers)]
    activations = (input_ids, control_classes, torch.ones_like(input_ids))
    for item in items:
        activations = item(activations)
    return HeadPipe(stage)(activations)
