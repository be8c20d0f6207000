"""Low-rank weight updates, and reading / writing them as PEFT LoRA adapters.

Every export tool works on one representation: a mapping from a base tensor name to a `LowRankUpdate`.

* additive (`left=False`): `P' = P + scale · B @ A`, with A `(r, in)` and B `(out, r)` — a LoRA.
* multiplicative (`left=True`): `P' = P + scale · B @ (A @ P)` = `(I + scale·B·A) · P`, with A `(r, out)` and
  B `(out, r)` — the seed's "multiplicative LoRA", which is what a Control Adapter does to a residual projection.

For fused expert parameters P `(experts, out, in)` (Mixtral `mlp.experts.down_proj`) an additive update holds one
pair per expert, A `(experts, r, in)` and B `(experts, out, r)`; a multiplicative one holds a single pair applied to
every expert. `torch.matmul` broadcasting makes one `apply` serve both.

PEFT layout (peft 0.21): module `m` has `base_model.model.<m>.lora_A.weight` `(r, in)` and `.lora_B.weight`
`(out, r)`, scale `lora_alpha / r` (`lora_alpha / √r` with rsLoRA), with per-module `rank_pattern` /
`alpha_pattern`. Embedding LoRAs store `lora_embedding_A` `(r, vocab)` / `lora_embedding_B` `(hidden, r)` for a
weight `(vocab, hidden)`: delta `(B·A)ᵀ`. A 3D parameter targeted with `target_parameters` is stored under its
module, `<module>.lora_A.weight` `(experts·r, in)` with rows `e·r + k`, and `.lora_B.weight` `(out, r·experts)`
with columns `k·experts + e`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from craft.errors import UserError, require_directory
from craft.export.checkpoint import read_json, safetensors_file

PEFT_PREFIX = "base_model.model."
MULTIPLICATIVE_TYPE = "multiplicative_lora"
_EMBEDDING_MODULES = ("embed_tokens", "lm_head")


@dataclass
class LowRankUpdate:
    """`P' = P + scale·B@A` (additive) or `P' = P + scale·B@(A@P)` (`left=True`); shapes in the module docstring."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float = 1.0
    left: bool = False

    @property
    def rank(self) -> int:
        return self.A.shape[-2]

    def delta(self, base: torch.Tensor | None = None) -> torch.Tensor:
        """`P' − P` in float32; `base` (P) is needed only for a multiplicative update."""
        A, B = self.A.float(), self.B.float()
        if self.left:
            if base is None:
                raise ValueError("a multiplicative update needs the base weight")
            return self.scale * (B @ (A @ base.float()))
        return self.scale * (B @ A)

    def apply(self, base: torch.Tensor) -> torch.Tensor:
        """The updated weight, computed in float32 and returned in the base weight's dtype."""
        if self.left:
            fits = base.dim() >= 2 and self.A.shape[-1] == base.shape[-2] == self.B.shape[-2]
        else:
            fits = (*self.B.shape[:-1], self.A.shape[-1]) == tuple(base.shape)
        if not fits:
            raise UserError(f"update with factors A {list(self.A.shape)}, B {list(self.B.shape)} does not fit a base "
                            f"weight of shape {list(base.shape)} (adapter made for a different model?)")
        return (base.float() + self.delta(base)).to(base.dtype)

    def piece(self, expert: int | None, rows: tuple[int, int] | None) -> LowRankUpdate:
        """The update of one stored piece of the weight (see `checkpoint.Piece`): expert `expert` of a fused expert
        update, restricted to output rows `rows`. A multiplicative update acts on each expert alike."""
        A, B = self.A, self.B
        if expert is not None and not self.left:
            A, B = A[expert], B[expert]
        if rows is not None:
            if self.left:
                raise UserError("a multiplicative update cannot act on a row slice of a weight")
            B = B[rows[0]:rows[1]]
        return LowRankUpdate(A, B, self.scale, self.left)

    def folded(self) -> LowRankUpdate:
        """The same update with the scale folded into B (scale 1)."""
        return LowRankUpdate(self.A.float().contiguous(), (self.scale * self.B.double()).float(), 1.0, self.left)

    def to_additive(self, base: torch.Tensor) -> LowRankUpdate:
        """The same update as an additive one with scale 1: A' = A·P, B' = scale·B (exact; rank unchanged)."""
        if not self.left:
            return self
        A = self.A.double() @ base.double()  # (r, in) or (experts, r, in)
        B = (self.scale * self.B.double()).expand(*A.shape[:-2], *self.B.shape)
        return LowRankUpdate(A.float().contiguous(), B.float().contiguous())


def _module_of(weight_name: str) -> tuple[str, str | None]:
    """(module path, parameter name) of a base tensor name: `x.weight` -> (`x`, None); `x.experts.down_proj` is a
    fused parameter of module `x.experts`."""
    if weight_name.endswith(".weight"):
        return weight_name[: -len(".weight")], None
    module, _, param = weight_name.rpartition(".")
    return module, param


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's `rank_pattern` / `alpha_pattern` lookup: the first key that matches the end of the module path."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def adapter_kind(adapter_dir: str | Path) -> tuple[str, dict]:
    """Classify an adapter directory: ("control", cfg), ("lora", cfg) or ("multiplicative", cfg)."""
    adapter_dir = require_directory(adapter_dir, "adapter directory")
    config = read_json(adapter_dir / "adapter_config.json", "not an adapter directory (no adapter_config.json)")
    if config.get("adapter_type") == "control_adapter":
        return "control", config
    if config.get("adapter_type") == MULTIPLICATIVE_TYPE:
        return "multiplicative", config
    if config.get("peft_type") == "LORA":
        return "lora", config
    raise UserError(f"{adapter_dir / 'adapter_config.json'} is neither a Control Adapter, a PEFT LoRA (peft_type "
                    f"'LORA') nor a multiplicative LoRA; got peft_type={config.get('peft_type')!r}, "
                    f"adapter_type={config.get('adapter_type')!r}")


def _check_supported(config: dict, path: Path) -> None:
    unsupported = {
        "use_dora": config.get("use_dora"), "fan_in_fan_out": config.get("fan_in_fan_out"),
        "modules_to_save": config.get("modules_to_save"), "lora_bias": config.get("lora_bias"),
        "trainable_token_indices": config.get("trainable_token_indices"),
        "bias": config.get("bias", "none") != "none",
    }
    for key, value in unsupported.items():
        if value:
            raise UserError(f"{path}: LoRA option {key}={config.get(key)!r} is not supported by the export tools")


def read_lora(adapter_dir: str | Path) -> dict[str, LowRankUpdate]:
    """The updates of a PEFT LoRA (or a `craft convert --mode multiplicative` output), keyed by base tensor name."""
    adapter_dir = Path(adapter_dir)
    kind, config = adapter_kind(adapter_dir)
    if kind == "control":
        raise UserError(f"{adapter_dir} is a Control Adapter, not a LoRA")
    config_path = adapter_dir / "adapter_config.json"
    _check_supported(config, config_path)
    weights_path = adapter_dir / "adapter_model.safetensors"
    if not weights_path.is_file():
        raise UserError(f"{weights_path} not found (only safetensors adapters are supported)")
    target_parameters = list(config.get("target_parameters") or [])
    factors: dict[str, dict[str, torch.Tensor]] = {}
    with safetensors_file(weights_path) as handle:
        for key in handle.keys():
            if key.endswith(".base_layer.weight"):
                # PEFT's copy of an adapted embedding / lm_head base weight (save_embedding_layers); the merge
                # uses the base model's own tensor, and a shape mismatch with it is reported there.
                continue
            match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                                 r"(?:\.weight)?", key)
            if match is None:
                raise UserError(f"{weights_path}: unexpected tensor {key!r} (not a LoRA factor)")
            factors.setdefault(match.group(1), {})[match.group(2)] = handle.get_tensor(key)
    updates = {}
    for module, pair in factors.items():
        rank = int(_pattern_value(config.get("rank_pattern") or {}, module, config["r"]))
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"]))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        if "lora_embedding_A" in pair:  # delta (B·A)ᵀ = Aᵀ·Bᵀ
            updates[f"{module}.weight"] = LowRankUpdate(pair["lora_embedding_B"].T, pair["lora_embedding_A"].T, scale)
            continue
        if set(pair) != {"lora_A", "lora_B"}:
            raise UserError(f"{weights_path}: module {module} lacks lora_A or lora_B")
        A, B = pair["lora_A"], pair["lora_B"]
        name = _target_parameter_name(module, target_parameters, weights_path)
        if name is None or kind == "multiplicative":  # a multiplicative pair acts on every expert alike
            weight_name = f"{module}.weight" if name is None else f"{module}.{name}"
            updates[weight_name] = LowRankUpdate(A, B, scale, left=kind == "multiplicative")
        else:  # fused experts: unpack rows e·r+k of A and columns k·E+e of B
            experts = A.shape[0] // rank
            A = A.reshape(experts, rank, A.shape[-1])
            B = B.reshape(B.shape[0], rank, experts).permute(2, 0, 1)
            updates[f"{module}.{name}"] = LowRankUpdate(A.contiguous(), B.contiguous(), scale)
    return updates


def _target_parameter_name(module: str, target_parameters: list[str], path: Path) -> str | None:
    """The parameter a `target_parameters` LoRA on `module` adapts (None for an ordinary module LoRA)."""
    names = [t.rpartition(".")[2] for t in target_parameters
             if re.match(rf"(.*\.)?{re.escape(t.rpartition('.')[0])}$", module)]
    if len(names) > 1:
        raise UserError(f"{path}: several target_parameters on module {module} ({names}); PEFT nests those "
                        "wrappers and the export tools support one adapted parameter per module")
    return names[0] if names else None


def reject_embedding_updates(updates: dict[str, LowRankUpdate], what: str) -> None:
    """`what` (e.g. GGUF export) cannot carry LoRAs on the token embedding or output head."""
    for name in updates:
        if any(f"{part}." in name or name.startswith(part) for part in _EMBEDDING_MODULES):
            raise UserError(f"the adapter has a LoRA on {name}; {what} supports LoRAs on decoder-layer "
                            "projections only (not embed_tokens / lm_head)")


def write_lora(updates: dict[str, LowRankUpdate], out_dir: Path, base_model_name_or_path: str | None,
               multiplicative: bool = False) -> None:
    """Save updates (all of one rank, scale 1) as a PEFT LoRA directory `PeftModel.from_pretrained` loads.

    `lora_alpha = r` so PEFT's scale `alpha / r` is exactly 1 and the stored factors are the delta's factors.
    With `multiplicative=True` the directory is marked `adapter_type: "multiplicative_lora"` (no `peft_type`), so
    PEFT refuses to load it as an additive LoRA; `craft merge --multiplicative` reads it.
    """
    from peft import LoraConfig

    ranks = {update.rank for update in updates.values()}
    if len(ranks) != 1 or any(update.scale != 1.0 for update in updates.values()):
        raise ValueError("write_lora expects updates of a single rank with scale 1")
    rank = ranks.pop()
    tensors, target_modules, target_parameters = {}, [], []
    for weight_name, update in updates.items():
        module, parameter = _module_of(weight_name)
        A, B = update.A, update.B
        if parameter is None:
            target_modules.append(module)
        else:
            target_parameters.append(weight_name)
        if parameter is not None and not update.left:  # fused experts: pack as PEFT's ParamWrapper stores them
            experts = A.shape[0]
            A = A.reshape(experts * rank, A.shape[-1])
            B = B.permute(1, 2, 0).reshape(B.shape[1], rank * experts)
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = A.float().contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = B.float().contiguous()
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(set(target_modules)) or [],
                        target_parameters=sorted(target_parameters) or None, lora_dropout=0.0, bias="none",
                        base_model_name_or_path=base_model_name_or_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    if multiplicative:
        config_path = out_dir / "adapter_config.json"
        data = json.loads(config_path.read_text())
        data.pop("peft_type", None)
        data["adapter_type"] = MULTIPLICATIVE_TYPE
        data["description"] = ("multiplicative LoRA: W' = W + (lora_alpha/r) * B @ A @ W for each target; "
                               "merge with `craft merge --multiplicative`")
        config_path.write_text(json.dumps(data, indent=2))
    save_file(tensors, out_dir / "adapter_model.safetensors", metadata={"format": "pt"})
