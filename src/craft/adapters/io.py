"""Saving and loading Control Adapters: `adapter_model.safetensors` + `adapter_config.json`.

Tensors (in the adapters' storage dtype), for each adapted decoder layer i:
  lowrank:   `layers.{i}.control_A` (r, hidden), `layers.{i}.control_B` (hidden, r)   W = scale * B @ A
  symmetric: `layers.{i}.control_Q` (hidden, r), `layers.{i}.control_S` (r,)           W = Q diag(exp(S) - 1) Q^T

`adapter_config.json` keys:
  adapter_type "control_adapter"; model_type (the HF model_type, which is the family name); family (same);
  base_model_name_or_path (model.config._name_or_path); target; type; rank; alpha (the effective alpha, sqrt(rank)
  when not given); scale (alpha / rank for lowrank, 1 for symmetric); layers (list of layer indices);
  hidden_size; num_hidden_layers; inverse; neumann_order; gamma; class0_lambda; dropout; dtype; craft_version.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import UserError, first_line, require_directory
from .config import ControlAdapterConfig
from .families import family_of, unwrap_peft
from .layer import ControlAdapter
from .model import add_control_adapters, control_adapters

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_TYPE = "control_adapter"
_TENSOR_NAMES = {"lowrank": ("A", "B"), "symmetric": ("Q", "S")}
_REQUIRED_KEYS = ("model_type", "type", "rank", "layers", "hidden_size", "num_hidden_layers")


def _tensor_key(layer_index: int, param_name: str) -> str:
    return f"layers.{layer_index}.control_{param_name}"


def save_control_adapter(model: torch.nn.Module, directory) -> Path:
    """Write the model's Control Adapters to `directory` (created if needed); returns the directory path."""
    from safetensors.torch import save_file

    import craft

    adapters = list(control_adapters(model))
    if not adapters:
        raise UserError("the model has no control adapters to save")
    base = unwrap_peft(model)
    config: ControlAdapterConfig | None = getattr(model, "control_adapter_config", None) or \
        getattr(base, "control_adapter_config", None)
    if config is None:
        raise UserError("the model's control adapters were not added by add_control_adapters (no config found)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {_tensor_key(a.layer_index, name): getattr(a, name).detach().cpu().contiguous()
               for a in adapters for name in _TENSOR_NAMES[a.type]}
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    facts = family_of(base)
    settings = {
        "adapter_type": ADAPTER_TYPE,
        "model_type": base.config.model_type,
        "family": facts.name,
        "base_model_name_or_path": getattr(base.config, "_name_or_path", "") or "",
        "target": config.target,
        "type": config.type,
        "rank": config.rank,
        "alpha": config.effective_alpha,
        "scale": adapters[0].scale,
        "layers": [a.layer_index for a in adapters],
        "hidden_size": base.config.hidden_size,
        "num_hidden_layers": base.config.num_hidden_layers,
        "inverse": config.inverse,
        "neumann_order": config.neumann_order,
        "gamma": config.gamma,
        "class0_lambda": config.class0_lambda,
        "dropout": config.dropout,
        "dtype": config.dtype,
        "craft_version": craft.__version__,
    }
    (directory / CONFIG_NAME).write_text(json.dumps(settings, indent=2) + "\n")
    return directory


def read_control_adapter(directory) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, {tensor name: tensor}) of a saved Control Adapter; needs no model (for export tools)."""
    from safetensors.torch import load_file

    directory = require_directory(directory, "control adapter directory")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise UserError(f"{str(directory / name)!r} is missing: not a saved control adapter")
    try:
        settings = json.loads((directory / CONFIG_NAME).read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{str(directory / CONFIG_NAME)!r} is not valid JSON: {error}") from None
    if isinstance(settings, dict) and settings.get("peft_type") == "LORA" and "adapter_type" not in settings:
        raise UserError(f"{str(directory)!r} is a PEFT LoRA, not a Control Adapter (a LoRA needs no conversion: "
                        f"merge or export it directly)")
    if not isinstance(settings, dict) or settings.get("adapter_type") != ADAPTER_TYPE:
        found = settings.get("adapter_type") if isinstance(settings, dict) else settings
        raise UserError(f"{str(directory / CONFIG_NAME)!r} has adapter_type {found!r}, expected {ADAPTER_TYPE!r}")
    missing = [key for key in _REQUIRED_KEYS if key not in settings]
    if missing:
        raise UserError(f"{str(directory / CONFIG_NAME)!r} lacks the control adapter keys {', '.join(missing)}")
    if settings["type"] not in _TENSOR_NAMES or not isinstance(settings["layers"], list):
        raise UserError(f"{str(directory / CONFIG_NAME)!r}: type must be one of {list(_TENSOR_NAMES)} and layers "
                        f"a list; got type {settings['type']!r}, layers {settings['layers']!r}")
    try:
        tensors = load_file(str(directory / WEIGHTS_NAME))
    except Exception as err:  # safetensors' own error type, OSError, ...: the file is unusable
        raise UserError(f"{str(directory / WEIGHTS_NAME)!r} is not a readable safetensors file "
                        f"({first_line(err)})") from None
    expected = {_tensor_key(i, n) for i in settings["layers"] for n in _TENSOR_NAMES[settings["type"]]}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise UserError(f"{str(directory / WEIGHTS_NAME)!r} does not match its config: missing {missing}, "
                        f"unexpected {extra}")
    return settings, tensors


def config_from_saved(settings: dict) -> ControlAdapterConfig:
    """The `ControlAdapterConfig` stored in an `adapter_config.json` dict."""
    values = {k: settings[k] for k in ("rank", "alpha", "target", "type", "inverse", "neumann_order", "gamma",
                                        "class0_lambda", "dtype") if k in settings}
    values["dropout"] = settings.get("dropout", 0.0)
    values["layers_to_transform"] = list(settings["layers"])
    return ControlAdapterConfig(**values)


def load_control_adapter(model: torch.nn.Module, directory) -> torch.nn.Module:
    """Add Control Adapters to `model` as saved in `directory` and load their weights; returns `model`."""
    settings, tensors = read_control_adapter(directory)
    base = unwrap_peft(model)
    if settings["model_type"] != base.config.model_type:
        raise UserError(f"control adapter in {str(directory)!r} was trained on model type "
                        f"{settings['model_type']!r}, but the model is {base.config.model_type!r}")
    if settings["hidden_size"] != base.config.hidden_size:
        raise UserError(f"control adapter in {str(directory)!r} has hidden_size {settings['hidden_size']}, "
                        f"but the model has {base.config.hidden_size}")
    if settings["num_hidden_layers"] != base.config.num_hidden_layers:
        raise UserError(f"control adapter in {str(directory)!r} is for {settings['num_hidden_layers']} layers, "
                        f"but the model has {base.config.num_hidden_layers}")
    add_control_adapters(model, config_from_saved(settings))
    with torch.no_grad():
        for adapter in control_adapters(model):
            _load_into(adapter, tensors)
    return model


def _load_into(adapter: ControlAdapter, tensors: dict[str, torch.Tensor]):
    for name in _TENSOR_NAMES[adapter.type]:
        param = getattr(adapter, name)
        value = tensors[_tensor_key(adapter.layer_index, name)]
        if value.shape != param.shape:
            raise UserError(f"saved tensor {_tensor_key(adapter.layer_index, name)} has shape {tuple(value.shape)}, "
                            f"expected {tuple(param.shape)}")
        param.copy_(value)
