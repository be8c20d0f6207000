"""Attaching Control Adapters to a causal LM and routing per-token control classes to them.

`add_control_adapters` puts one `ControlAdapter` on each selected decoder layer (as the submodule
`layer.control_adapter`) and registers forward hooks:

* target "sublayers": a forward hook on each of the family's `write_points` (attention and MLP for sequential and
  parallel blocks; Gemma 2's post-sublayer norms) adds `T(delta) - delta` to the module's output (its first element
  when it returns a tuple), so the residual stream receives `T(delta)`;
* target "block": a forward hook on the decoder layer replaces its output `out` by `h + T(out - h)`;
* a forward pre-hook on each adapted layer clears the adapter's aux accumulator;
* a forward pre-hook (with kwargs) on the top model pops the `control_classes` keyword and routes it (and the
  `attention_mask`, for the aux loss) to every adapter, so `model(input_ids, control_classes=...)` works with any
  trainer whose collator emits a `control_classes` column.

Class convention: `control_classes[b, t]` is the class applied to the hidden state at position t, the position
whose logits predict token t+1 — i.e. classes are aligned with the (internally shifted) labels. A position takes the
class of the token it predicts; `classes_for_positions` turns per-token classes into this layout.

Hooks are small callable objects rather than closures, so `copy.deepcopy(model)` yields a model whose hooks drive its
own adapters. Call layers as modules (`layer(h, ...)`), not `layer.forward(...)`, so the hooks run.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ..errors import UserError
from .config import ControlAdapterConfig, resolve_layers
from .families import decoder_layers, family_of, unwrap_peft
from .layer import ControlAdapter

ADAPTER_ATTRIBUTE = "control_adapter"


def _replace_first(output, first):
    return (first, *output[1:]) if isinstance(output, tuple) else first


def _first(output):
    return output[0] if isinstance(output, tuple) else output


class _WriteHook:
    """Forward hook on a residual-writing module: output -> output + (T(output) - output)."""

    def __init__(self, adapter: ControlAdapter):
        self.adapter = adapter

    def __call__(self, module, args, output):
        delta = _first(output)
        change = self.adapter.delta_change(delta.to(self.adapter.compute_dtype))
        if change is None:
            return None
        return _replace_first(output, (delta.to(change.dtype) + change).to(delta.dtype))


class _BlockHook:
    """Forward hook (with kwargs) on a decoder layer: out -> out + (T(out - h) - (out - h)) = h + T(out - h)."""

    def __init__(self, adapter: ControlAdapter):
        self.adapter = adapter

    def __call__(self, module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        out = _first(output)
        dtype = self.adapter.compute_dtype
        change = self.adapter.delta_change(out.to(dtype) - hidden.to(dtype))
        if change is None:
            return None
        return _replace_first(output, (out.to(dtype) + change).to(out.dtype))


class _ResetAuxHook:
    """Forward pre-hook on a decoder layer: a new layer forward starts a new aux accumulation."""

    def __init__(self, adapter: ControlAdapter):
        self.adapter = adapter

    def __call__(self, module, args):
        self.adapter.reset_aux()


class _RoutingHook:
    """Forward pre-hook (with kwargs) on the top model: pops `control_classes` and routes it to the adapters."""

    def __init__(self, adapters: list[ControlAdapter]):
        self.adapters = adapters

    def __call__(self, module, args, kwargs):
        classes = kwargs.pop("control_classes", None)
        token_mask = None
        attention_mask = kwargs.get("attention_mask")
        token_source = kwargs.get("input_ids", args[0] if args else None)
        if token_source is None and kwargs.get("inputs_embeds") is not None:
            token_source = kwargs["inputs_embeds"][..., 0]
        if isinstance(attention_mask, torch.Tensor) and isinstance(token_source, torch.Tensor) \
                and attention_mask.shape == token_source.shape:
            token_mask = attention_mask
        _route(self.adapters, classes, token_mask)
        return args, kwargs


_HOOK_TYPES = (_WriteHook, _BlockHook, _ResetAuxHook, _RoutingHook)


def control_adapters(module: torch.nn.Module) -> Iterator[ControlAdapter]:
    """Every `ControlAdapter` inside `module` (a model, a PEFT wrapper, or a single decoder layer), in layer order."""
    return (m for m in module.modules() if isinstance(m, ControlAdapter))


def add_control_adapters(model: torch.nn.Module, config: ControlAdapterConfig | None = None) -> torch.nn.Module:
    """Add a Control Adapter to each selected decoder layer of `model`, in place; returns `model`.

    All base parameters are frozen; only adapter parameters are trainable. Works on plain HF causal LMs of every
    family in `FAMILIES`, on PEFT-wrapped ones, and on bitsandbytes-quantized ones (adapters stay in
    `config.dtype`, float32 by default, whatever the base dtype).
    """
    config = config or ControlAdapterConfig()
    facts = family_of(unwrap_peft(model))
    layers = decoder_layers(model)
    if any(True for _ in control_adapters(model)):
        raise UserError("the model already has control adapters; remove them first (remove_control_adapters)")
    hidden_size = unwrap_peft(model).config.hidden_size
    for param in model.parameters():
        param.requires_grad_(False)
    adapters = []
    for index in resolve_layers(config.layers_to_transform, len(layers)):
        layer = layers[index]
        device = next(layer.parameters()).device
        adapter = ControlAdapter(hidden_size, config, index, device="cpu" if device.type == "meta" else device)
        setattr(layer, ADAPTER_ATTRIBUTE, adapter)
        layer.register_forward_pre_hook(_ResetAuxHook(adapter))
        if config.target == "block":
            layer.register_forward_hook(_BlockHook(adapter), with_kwargs=True)
        else:
            for name in facts.write_points:
                layer.get_submodule(name).register_forward_hook(_WriteHook(adapter))
        adapters.append(adapter)
    model.register_forward_pre_hook(_RoutingHook(adapters), with_kwargs=True)
    model.control_adapter_config = config
    return model


def remove_control_adapters(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `add_control_adapters`: remove the hooks and the adapter submodules (base stays frozen); returns model."""
    for module in list(model.modules()):
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key in [k for k, hook in hooks.items() if isinstance(hook, _HOOK_TYPES)]:
                del hooks[key]
                module._forward_hooks_with_kwargs.pop(key, None)
                module._forward_pre_hooks_with_kwargs.pop(key, None)
        if isinstance(getattr(module, ADAPTER_ATTRIBUTE, None), ControlAdapter):
            delattr(module, ADAPTER_ATTRIBUTE)
    if hasattr(model, "control_adapter_config"):
        del model.control_adapter_config
    return model


def _as_classes(value):
    """Validate a class spec: None, an int in {-1, 0, 1}, or an integer-valued tensor with values in {-1, 0, 1}."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        value = torch.tensor(value)
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and not torch.equal(value, value.round()):
            raise UserError("control_classes must hold integers -1, 0 or 1")
        value = value.long()
        if value.numel() and bool(((value < -1) | (value > 1)).any()):
            raise UserError(f"control_classes must hold only -1, 0 or 1; got values {value.unique().tolist()}")
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value not in (-1, 0, 1):
        raise UserError(f"control class must be -1, 0 or 1, got {value!r}")
    return value


def _route(adapters, classes, token_mask=None):
    classes = _as_classes(classes)
    for adapter in adapters:
        adapter.classes = classes
        adapter.token_mask = token_mask


def set_control_classes(module: torch.nn.Module, control_classes, token_mask: torch.Tensor | None = None) -> None:
    """Set the classes used by every adapter inside `module` (a whole model or one decoder layer).

    Args:
        control_classes: None (back to the default class, +1 unless inside `control_class`), an int in
            {-1, 0, 1} for all tokens, or a tensor (B, T) of per-position classes (see the module doc for the
            alignment with labels).
        token_mask: optional (B, T) mask; positions where it is 0 (padding) are left out of the class-0 aux loss.
    """
    _route(list(control_adapters(module)), control_classes, token_mask)


@contextlib.contextmanager
def control_class(model: torch.nn.Module, value: int = 1, strength: float = 1.0):
    """Context manager for inference: all tokens use class `value` (-1, 0, +1) and W is scaled to `strength` * W.

    Example::

        with control_class(model, -1, strength=0.5):
            out = model.generate(input_ids, max_new_tokens=20)
    """
    adapters = list(control_adapters(model))
    if not adapters:
        raise UserError("the model has no control adapters")
    value = _as_classes(value)
    if not isinstance(value, int):
        raise UserError(f"control_class value must be -1, 0 or 1, got {value!r}")
    saved = [(a.default_class, a.strength, a.classes) for a in adapters]
    for adapter in adapters:
        adapter.default_class, adapter.strength, adapter.classes = value, float(strength), None
    try:
        yield model
    finally:
        for adapter, (default_class, strength_before, classes) in zip(adapters, saved):
            adapter.default_class, adapter.strength, adapter.classes = default_class, strength_before, classes


def control_aux_loss(module: torch.nn.Module, reduction: str = "mean") -> torch.Tensor:
    """class0_lambda * the class-0 aux of the last forward, reduced over the adapters inside `module`.

    Each adapter's aux is the mean over its neutral tokens of ||W delta||^2 / ||delta||^2 (see `layer.py`).
    `reduction="mean"` (default) averages over adapters, so the weight does not grow with the number of layers;
    `"sum"` adds them (a pipeline stage can sum its layers and divide by the model's adapter count).
    Returns a scalar tensor; 0 when class0_lambda is 0 or no token was neutral. Add it to the training loss.
    """
    if reduction not in ("mean", "sum"):
        raise UserError(f"control_aux_loss reduction must be 'mean' or 'sum', got {reduction!r}")
    adapters = list(control_adapters(module))
    if not adapters:
        return torch.zeros(())
    terms = [a.class0_lambda * a.aux_value() for a in adapters]
    total = torch.stack([t.to(terms[0].device) for t in terms]).sum()
    return total / len(adapters) if reduction == "mean" else total


def classes_for_positions(token_classes: torch.Tensor) -> torch.Tensor:
    """Per-token classes (B, T) -> per-position classes (B, T) in the label-aligned convention.

    Position t predicts token t+1, so it takes the class of token t+1; the last position predicts nothing inside
    the sequence and keeps its own token's class. Example: token classes [0, 0, 1, 1] (a neutral prompt, then a
    +1 response) give positions [0, 1, 1, 1] — the prompt's last position already predicts the first response
    token with the +1 transform.
    """
    token_classes = torch.as_tensor(token_classes)
    return torch.cat([token_classes[..., 1:], token_classes[..., -1:]], dim=-1)
