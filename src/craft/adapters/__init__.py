"""Control Adapters and the per-family model facts they (and the engine and export tools) rely on.

Public API (see docs/control_adapters.md):
    ControlAdapterConfig, ControlAdapter
    add_control_adapters, remove_control_adapters, control_adapters
    set_control_classes, control_class, control_aux_loss, classes_for_positions
    save_control_adapter, load_control_adapter, read_control_adapter
    composite_weight_decay_, lora_factor_pairs, control_adapter_factor_pairs, orthogonality_step_, adapter_stats
"""

from .config import ControlAdapterConfig, resolve_layers
from .families import FAMILIES, FamilyFacts, decoder_layers, family_of, unwrap_peft
from .io import config_from_saved, load_control_adapter, read_control_adapter, save_control_adapter
from .layer import ControlAdapter
from .model import (
    add_control_adapters,
    classes_for_positions,
    control_adapters,
    control_aux_loss,
    control_class,
    remove_control_adapters,
    set_control_classes,
)
from .regularizers import (
    adapter_stats,
    composite_weight_decay_,
    control_adapter_factor_pairs,
    lora_factor_pairs,
    orthogonality_step_,
    spectral_norm,
)

__all__ = [
    "FAMILIES", "FamilyFacts", "decoder_layers", "family_of", "unwrap_peft",
    "ControlAdapterConfig", "ControlAdapter", "resolve_layers",
    "add_control_adapters", "remove_control_adapters", "control_adapters",
    "set_control_classes", "control_class", "control_aux_loss", "classes_for_positions",
    "save_control_adapter", "load_control_adapter", "read_control_adapter", "config_from_saved",
    "composite_weight_decay_", "lora_factor_pairs", "control_adapter_factor_pairs", "orthogonality_step_",
    "adapter_stats", "spectral_norm",
]
