"""Control Adapter -> low-rank updates of the residual projections (the math behind convert, merge and GGUF export).

A Control Adapter transforms each residual write `d` of an adapted decoder layer into `T·d`, with
`T = I + W` (class +1, `W = s·B·A`, strength X: `W -> X·W`) or `T = (I + W)⁻¹` (class −1, exact Woodbury
inverse or the adapter's Neumann truncation). `ControlAdapter.effective_factors` gives `T − I = s'·B'·A` (rank r),
so for a residual projection P (out = hidden) the adapted model equals the base model with

    P' = T·P = P + s'·B'·(A·P)                      (a multiplicative update, `left=True`)
       = P + B''·A''  with  A'' = A·P (r × in),  B'' = s'·B'   (the same update as an additive LoRA, rank r).

This is exact when the write is linear in P: target "sublayers" without a norm after the sublayer, and parallel
blocks (Cohere: the block delta is the sum of the two writes) for either target. Otherwise it is an approximation:

* target "block" on a sequential block: the block output is `h + T·(attn + mlp(h + attn))`; T on both
  projections makes the MLP read `h + T·attn`, T on the MLP projection alone leaves `attn` untransformed
  (`block_rule` "all" / "mlp" in `projection_updates`);
* Gemma 2 (a norm after each sublayer: the write is `g ⊙ P·x / rms(P·x)` with `g = 1 + weight`): the update
  used is `P' = G⁻¹·T·G·P` (G = diag(g)), which makes the written vector exactly `T·write` up to a per-token
  factor `rms(P·x) / rms(P'·x)`; still rank r: `B'' = G⁻¹·s'·B'`, `A'' = A·G·P`.

`craft convert` measures and prints the error of the approximations on logits (see `convert.measure_logits_error`).
Mixtral's fused expert weight `mlp.experts.down_proj` `(experts, hidden, inter)` gets `T` on every expert.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from craft.adapters.families import FAMILIES, FamilyFacts
from craft.errors import UserError
from craft.export.checkpoint import BaseCheckpoint
from craft.export.lora import LowRankUpdate

_GEMMA_NORM_OFFSET = 1.0  # Gemma RMSNorm multiplies by (1 + weight)


@dataclass
class ControlAdapterFile:
    """A saved Control Adapter: its `adapter_config.json` and factor tensors keyed by layer index."""

    path: Path
    config: dict
    layers: dict[int, dict[str, torch.Tensor]]  # layer -> {"A", "B"} or {"Q", "S"}

    @property
    def family(self) -> FamilyFacts:
        model_type = self.config.get("model_type")
        if model_type not in FAMILIES:
            raise UserError(f"{self.path / 'adapter_config.json'}: model_type {model_type!r} is not supported; "
                            f"supported families: {', '.join(FAMILIES)}")
        return FAMILIES[model_type]

    @property
    def exact(self) -> bool:
        """Whether the per-projection conversion reproduces the adapter exactly (see module docstring)."""
        family = self.family
        if family.norm_after_sublayer:
            return False
        return family.parallel_block or self.config.get("target", "sublayers") == "sublayers"

    @property
    def block_rule_matters(self) -> bool:
        """Target "block" on a sequential block: which projections carry T is a choice (see `projection_updates`)."""
        return self.config.get("target", "sublayers") == "block" and not self.family.parallel_block


def warn_if_approximate(adapter: ControlAdapterFile, block_rule: str) -> None:
    """Tools that cannot measure the error of an approximate conversion say so, and how to measure it."""
    if adapter.exact:
        return
    rule = f" with block rule {block_rule!r}" if adapter.block_rule_matters else ""
    option = f" --block-rule {block_rule}" if adapter.block_rule_matters else ""
    print(f"note: this Control Adapter is not exactly representable on the projections (target "
          f"{adapter.config.get('target')!r} on {adapter.family.name}); approximating it{rule}. "
          f"`craft convert{option}` measures the error of this approximation")


def read_control_adapter_file(adapter_dir: str | Path) -> ControlAdapterFile:
    """Load and validate a saved Control Adapter (via `craft.adapters.read_control_adapter`), grouped by layer."""
    from craft.adapters import read_control_adapter

    config, tensors = read_control_adapter(adapter_dir)
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():  # layers.{i}.control_{A,B,Q,S}
        prefix, _, factor = key.rpartition(".control_")
        layers.setdefault(int(prefix.split(".")[1]), {})[factor] = tensor
    adapter = ControlAdapterFile(Path(adapter_dir), config, dict(sorted(layers.items())))
    adapter.family  # noqa: B018 -- validates model_type early
    return adapter


def adapter_modules(adapter: ControlAdapterFile) -> dict[int, torch.nn.Module]:
    """Per layer, the adapter's own `ControlAdapter` module (float64, eval) holding the saved factors."""
    from craft.adapters import ControlAdapter, config_from_saved

    config = config_from_saved({**adapter.config, "dtype": "float32", "dropout": 0.0})
    hidden = int(adapter.config["hidden_size"])
    modules = {}
    with torch.random.fork_rng(devices=[]):  # the module's random init must not disturb the caller's RNG
        for layer, tensors in adapter.layers.items():
            module = ControlAdapter(hidden, config, layer).double().eval()
            try:
                module.load_state_dict({name: t.double() for name, t in tensors.items()})
            except RuntimeError as err:
                raise UserError(f"{adapter.path}: layer {layer} factors do not match the config "
                                f"(type {config.type}, rank {config.rank}, hidden {hidden}): {err}") from None
            modules[layer] = module
    return modules


def transforms(adapter: ControlAdapterFile, direction: int, strength: float) -> dict[int, LowRankUpdate]:
    """Per layer, `T − I` as a multiplicative update (A `(r, h)`, B `(h, r)`, scale s'), computed in float64.

    The factors come from the adapter's own `ControlAdapter.effective_factors`, so conversion follows exactly the
    forward the adapter was trained with (Woodbury or Neumann inverse, strength scaling W -> X·W).
    """
    if direction not in (1, -1):
        raise UserError(f"--direction must be 1 or -1, got {direction}")
    if not math.isfinite(strength):
        raise UserError(f"--strength must be a finite number, got {strength}")
    updates = {}
    with torch.no_grad():
        for layer, module in adapter_modules(adapter).items():
            a, b, s = module.effective_factors(direction, strength)
            updates[layer] = LowRankUpdate(a.detach().clone(), b.detach().clone(), float(s), left=True)
    return updates


def _gemma_norm_gain(base: BaseCheckpoint, layer: int, norm: str) -> torch.Tensor:
    return base.get_tensor(f"model.layers.{layer}.{norm}.weight").double() + _GEMMA_NORM_OFFSET


BLOCK_RULES = ("all", "mlp")
DEFAULT_BLOCK_RULE = "mlp"  # for tools that cannot measure: it had the lower error in our measurements (docs/export.md)


def add_control_options(parser, measured_block_rule: bool = False) -> None:
    """The command-line options every tool that turns a Control Adapter into weights shares."""
    parser.add_argument("--direction", type=int, choices=(1, -1), default=1,
                        help="Control Adapters: the class +1 transform (I+W) or the class -1 transform (I+W)^-1")
    parser.add_argument("--strength", type=float, default=1.0, help="Control Adapters: scale W by X (W -> X*W)")
    choices = ("auto", *BLOCK_RULES) if measured_block_rule else BLOCK_RULES
    parser.add_argument("--block-rule", choices=choices, default="auto" if measured_block_rule else DEFAULT_BLOCK_RULE,
                        help="Control Adapters with target 'block' on sequential blocks (approximate): put T on all "
                             "residual projections or on the MLP output projection only"
                             + ("; auto measures both and keeps the better" if measured_block_rule else ""))


def projection_updates(adapter: ControlAdapterFile, base: BaseCheckpoint, direction: int = 1,
                       strength: float = 1.0, block_rule: str = "all") -> dict[str, LowRankUpdate]:
    """Multiplicative updates of the residual projections of every adapted layer, keyed by base tensor name.

    `block_rule` matters only for target "block" on a sequential block, where no choice is exact: "all" puts T on
    every residual projection (the attention write is transformed, but the MLP then reads it transformed too);
    "mlp" puts T on the MLP's output projection only (the seed's rule: the MLP input is right, the attention
    write is not transformed). `craft convert` measures both and keeps the better one.
    """
    base.check_adapter(adapter.path, adapter.config)
    family = adapter.family
    if block_rule not in BLOCK_RULES:
        raise UserError(f"block rule must be one of {', '.join(BLOCK_RULES)}, got {block_rule!r}")
    chosen = range(len(family.residual_projections))
    if block_rule == "mlp" and adapter.block_rule_matters:
        chosen = [len(family.residual_projections) - 1]  # the MLP's output projection is listed last
    updates = {}
    for layer, update in transforms(adapter, direction, strength).items():
        for index in chosen:
            A, B = update.A, update.B
            if family.norm_after_sublayer:  # P' = G⁻¹ T G P (module docstring)
                gain = _gemma_norm_gain(base, layer, family.write_points[index])
                A, B = A * gain, B / gain[:, None]
            key = base.projection_key(layer, family.residual_projections[index])
            updates[key] = LowRankUpdate(A, B, update.scale, left=True)
    return updates


def additive_updates(adapter: ControlAdapterFile, base: BaseCheckpoint, direction: int = 1,
                     strength: float = 1.0, block_rule: str = "all") -> dict[str, LowRankUpdate]:
    """The projection updates as additive LoRA factors (scale 1), reading each base projection once."""
    return {name: update.to_additive(base.get_tensor(name))
            for name, update in projection_updates(adapter, base, direction, strength, block_rule).items()}


def base_dir_for(adapter: ControlAdapterFile, base_dir: str | None) -> BaseCheckpoint:
    """The base checkpoint: `--base` if given, else the adapter's `base_model_name_or_path` (a local directory)."""
    path = base_dir or adapter.config.get("base_model_name_or_path")
    if not path:
        raise UserError(f"{adapter.path}: no base model given; pass --base BASE_DIR")
    if not Path(path).exists():
        raise UserError(f"base model directory {path} does not exist "
                        f"({'--base' if base_dir else 'base_model_name_or_path in the adapter config'}); "
                        "pass --base with a local directory")
    return BaseCheckpoint.open(path)
