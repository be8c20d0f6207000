"""Capture of the last hidden state through a forward hook on the model's final norm, and nothing else.

Hugging Face causal LMs return, as the last entry of ``output_hidden_states``, the output of the final norm
(``model.model.norm``). Asking for ``output_hidden_states=True`` keeps every layer's output alive; a forward hook
on the final norm keeps only the one tensor the contrastive loss needs. When the final norm cannot be found, this
module raises: it never falls back to ``output_hidden_states`` behind the user's back.
"""

from __future__ import annotations

import re

from torch import Tensor, nn

from craft.errors import UserError

# Leaf names that final norms have across architectures: Llama-style `norm`, Phi-1 `final_layernorm`,
# GPT-2 / Falcon / Bloom `ln_f`, OPT `final_layer_norm`, Mamba `norm_f`.
FINAL_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_layer_norm", "norm_f")

_HINT = ("the hidden-state hook cannot be used with this model; set craft_use_hidden_state_hook=False to take "
         "the last entry of output_hidden_states instead")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The underlying transformers model of a PEFT ``PeftModel``, DDP / DataParallel or ``torch.compile`` wrapper."""
    for _ in range(16):
        if hasattr(model, "get_base_model") and callable(model.get_base_model):  # peft.PeftModel
            inner = model.get_base_model()
        elif type(model).__module__.startswith("peft.") and isinstance(getattr(model, "model", None), nn.Module):
            # a PEFT tuner such as LoraModel (PeftModel.base_model)
            inner = model.model
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            inner = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            inner = model._orig_mod
        else:
            return model
        if inner is model:
            return model
        model = inner
    return model


def text_config(model: nn.Module):
    """The (text) config of a possibly wrapped model: ``config.get_text_config()`` where the config has it (multimodal
    configs), else the config itself."""
    config = unwrap_model(model).config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def is_norm_module(module: nn.Module) -> bool:
    """True for LayerNorm / RMSNorm modules, including model-specific classes (``LlamaRMSNorm``, ``CohereLayerNorm``)."""
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)):
        return True
    return "norm" in type(module).__name__.lower()


def _norm_width(module: nn.Module) -> int | None:
    weight = getattr(module, "weight", None)
    return int(weight.shape[-1]) if isinstance(weight, Tensor) and weight.dim() >= 1 else None


def find_final_norm(model: nn.Module) -> nn.Module:
    """The final norm of a causal LM: the module whose output is HF's last hidden state.

    ``model.model.norm`` for every supported family (RMSNorm or LayerNorm), also through a PEFT wrapper.
    Otherwise the search looks, by name, for a norm module called ``norm``, ``final_layernorm``, ``ln_f``,
    ``final_layer_norm`` or ``norm_f`` outside the decoder layers (whose width matches the output
    embedding's input when both are known), preferring the shallowest and, among those, the last registered.
    Nothing found is a `UserError`: the hook cannot be used and ``craft_use_hidden_state_hook=False`` is the way out.
    """
    base = unwrap_model(model)
    inner = getattr(base, "model", None)
    direct = getattr(inner, "norm", None) if isinstance(inner, nn.Module) else None
    if isinstance(direct, nn.Module) and is_norm_module(direct):
        return direct

    width = None
    get_output = getattr(base, "get_output_embeddings", None)
    if callable(get_output):
        try:
            head = get_output()
        except (AttributeError, NotImplementedError):
            head = None
        weight = getattr(head, "weight", None)
        if isinstance(weight, Tensor) and weight.dim() == 2:
            width = int(weight.shape[1])

    candidates = []
    for order, (name, module) in enumerate(base.named_modules()):
        parts = name.split(".")
        if not name or parts[-1] not in FINAL_NORM_NAMES or not is_norm_module(module):
            continue
        if any(re.fullmatch(r"\d+", part) for part in parts):  # inside a ModuleList of layers
            continue
        module_width = _norm_width(module)
        if width is not None and module_width is not None and module_width != width:
            continue
        candidates.append((len(parts), -order, module))
    if candidates:
        return min(candidates, key=lambda c: (c[0], c[1]))[2]
    raise UserError(f"cannot find the final norm of {type(base).__name__} (looked for model.model.norm and "
                    f"norm modules named {', '.join(FINAL_NORM_NAMES)} outside the decoder layers); {_HINT}")


class LastHiddenStateCapture:
    """Context manager that records the final norm's output, i.e. the last hidden state [B, T, H].

    ::

        with LastHiddenStateCapture(model) as cap:
            out = model(input_ids=ids, attention_mask=mask)
            hidden = cap.hidden          # == out.hidden_states[-1] had it been requested; autograd graph intact

    Exactly one forward hook is registered (on the final norm, see `find_final_norm`) and removed on exit. If the
    model runs several times inside the block, ``hidden`` is the latest output and ``calls`` counts them.
    ``norm`` overrides the module to hook.
    """

    def __init__(self, model: nn.Module, norm: nn.Module | None = None):
        self.model = model
        self.norm = norm if norm is not None else find_final_norm(model)
        self._hidden: Tensor | None = None
        self._handle = None
        self.calls = 0

    def _hook(self, module, inputs, output):
        if isinstance(output, (tuple, list)):
            output = output[0]
        self._hidden = output
        self.calls += 1

    def __enter__(self) -> "LastHiddenStateCapture":
        if self._handle is not None:
            raise RuntimeError("LastHiddenStateCapture is already active; it cannot be entered twice at once")
        self.clear()
        self._handle = self.norm.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @property
    def hidden(self) -> Tensor:
        """The captured last hidden state; a `RuntimeError` if the model has not run inside the block."""
        if self._hidden is None:
            raise RuntimeError(f"no hidden state was captured from {type(self.norm).__name__}: run the model's "
                               "forward inside the `with LastHiddenStateCapture(model)` block before reading .hidden")
        return self._hidden

    def clear(self) -> None:
        """Drop the captured tensor (and the graph it holds)."""
        self._hidden = None
        self.calls = 0


# ------------------------------------------------------------------------------ contrastive-ft 0.4.3 names


def last_hidden_state(output) -> Tensor:
    """The last hidden state [B, T, H] of a model output: the output itself if it is a tensor, else its
    ``last_hidden_state`` when set, else the last entry of its ``hidden_states`` (a sequence, or a tensor taken as
    is). An `AttributeError` when neither is there or the sequence is empty, a `TypeError` for another type."""
    if isinstance(output, Tensor):
        return output
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is not None:
        return hidden
    states = getattr(output, "hidden_states", None)
    if states is None:
        raise AttributeError("Model output missing last_hidden_state and hidden_states; run the model with "
                             "output_hidden_states=True or use the hidden-state hook")
    if isinstance(states, (list, tuple)):
        if not states:
            raise AttributeError("hidden_states sequence is empty")
        return states[-1]
    if isinstance(states, Tensor):
        return states
    raise TypeError(f"Unsupported hidden_states type: {type(states).__name__}")


def get_backbone(model: nn.Module) -> nn.Module:
    """The transformer body of a causal LM, without its LM head: ``model.model`` (Llama, Mistral, Qwen, ...),
    ``model.transformer`` (GPT-2 style) or ``model.encoder``, after unwrapping DDP / PEFT / ``torch.compile`` (and
    any object that holds the model as ``.module``); the model itself when it has none of them."""
    base = unwrap_model(model)
    while not isinstance(base, nn.Module) and hasattr(base, "module"):  # DDP-like wrappers that are not modules
        base = unwrap_model(base.module)
    for name in ("model", "transformer", "encoder"):
        body = getattr(base, name, None)
        if isinstance(body, nn.Module):
            return body
    return base


class LastHiddenStateHook(LastHiddenStateCapture):
    """contrastive-ft 0.4.3's hook object: a `LastHiddenStateCapture` attached from construction until `remove()`.

    ``LastHiddenStateHook(model, layer_name=None)`` hooks the final norm (`find_final_norm`; ``layer_name``, a
    dotted attribute path such as ``"model.norm"``, picks another module). ``get()`` returns the captured
    [B, T, H] (a `RuntimeError` before any forward), ``get_optional()`` it or None, ``clear()`` forgets it,
    ``is_attached`` tells whether the hook is registered; as a context manager it is removed on exit. A model
    without a findable norm is a `UserError` (the original attached nothing and failed later).
    """

    def __init__(self, model: nn.Module, layer_name: str | None = None):
        norm = None
        if layer_name is not None:
            norm = model
            for part in layer_name.split("."):
                if not hasattr(norm, part):
                    raise UserError(f"LastHiddenStateHook: {type(model).__name__} has no module {layer_name!r}")
                norm = getattr(norm, part)
        super().__init__(model, norm)
        super().__enter__()

    @property
    def hidden_state(self) -> Tensor | None:
        return self._hidden

    @property
    def is_attached(self) -> bool:
        return self._handle is not None

    def get(self) -> Tensor:
        return self.hidden

    def get_optional(self) -> Tensor | None:
        return self._hidden

    def remove(self) -> None:
        super().__exit__(None, None, None)
        self.clear()

    def __enter__(self) -> "LastHiddenStateHook":
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()
