"""`craft convert ADAPTER_DIR OUT_DIR`: a Control Adapter as a standard PEFT LoRA (or a multiplicative LoRA).

Additive mode (default) writes `adapter_config.json` + `adapter_model.safetensors` that
`PeftModel.from_pretrained(base, OUT_DIR)` loads: per adapted layer, a rank-r LoRA on each residual projection
with `lora_A = A·P` (r × in), `lora_B = s'·B'` (hidden × r), `lora_alpha = r` (PEFT scale 1, no rsLoRA); see
`craft.export.control` for the math and which cases are exact. Base projections P are read one tensor at a time
from `--base` (default: the adapter's `base_model_name_or_path`). Mixtral's fused experts use PEFT's
`target_parameters` (rank r per expert). `--direction -1` converts the inverse transform, `--strength X` uses
`W -> X·W`.

When the conversion is an approximation (target "block" on sequential blocks; Gemma 2) the tool measures and
prints its error on a probe batch (`probe_input_ids`): with logits `L0` (base), `La` (base + Control Adapter) and
`Ll` (base + converted LoRA), `effect error = ‖Ll − La‖_F / ‖La − L0‖_F` (the share of the adapter's effect on
the logits the LoRA gets wrong) and `logit error = ‖Ll − La‖_F / ‖La‖_F`. For target "block" on sequential blocks
`--block-rule auto` (default) measures both rules of `control.projection_updates` and keeps the one with the
lower effect error; this loads the base model (float32, CPU) a few times.

`--mode multiplicative` writes the seed's multiplicative form instead: per projection, factors (A (r × hidden),
B (hidden × r)) with `P' = P + B·A·P`, for `craft merge --multiplicative`; it needs no base weights.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from craft.export.control import (BLOCK_RULES, add_control_options, additive_updates, base_dir_for,
                                  projection_updates, read_control_adapter_file)
from craft.export.lora import write_lora
from craft.export.output import staged_directory

PROBE_SHAPE = (4, 32)
PROBE_SEED = 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter_dir", help="Control Adapter directory (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("out_dir", help="output directory for the LoRA")
    add_control_options(parser, measured_block_rule=True)
    parser.add_argument("--base", default=None, help="base model directory (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--mode", choices=("additive", "multiplicative"), default="additive",
                        help="additive: PEFT LoRA; multiplicative: factors of (I+W) for `craft merge --multiplicative`")
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")


def run(args: argparse.Namespace) -> int:
    adapter = read_control_adapter_file(args.adapter_dir)
    base = base_dir_for(adapter, args.base)
    rules = [args.block_rule] if args.block_rule != "auto" else (
        list(BLOCK_RULES) if adapter.block_rule_matters else [BLOCK_RULES[0]])
    errors = None
    if not adapter.exact:
        errors = _measure_rules(adapter, base, args, rules)
        rules = [min(errors, key=lambda rule: errors[rule]["effect_error"])]
    if args.mode == "multiplicative":
        updates = {name: update.folded() for name, update in
                   projection_updates(adapter, base, args.direction, args.strength, rules[0]).items()}
    else:
        updates = additive_updates(adapter, base, args.direction, args.strength, rules[0])
    with staged_directory(args.out_dir, args.force) as staging:
        write_lora(updates, staging, str(base.path), multiplicative=args.mode == "multiplicative")
    rank = next(iter(updates.values())).rank
    print(f"wrote {args.mode} LoRA to {args.out_dir}: {len(updates)} projections in {len(adapter.layers)} layers, "
          f"rank {rank}, direction {args.direction:+d}, strength {args.strength:g}")
    if errors is None:
        print("conversion is exact (sublayer target without a post-sublayer norm, or a parallel block)")
        return 0
    for rule, measured in errors.items():
        print(f"  block rule {rule!r}: effect error {measured['effect_error']:.6e}, "
              f"logit error {measured['logit_error']:.6e}")
    kept = errors[rules[0]]
    print(f"conversion is approximate ({_why_approximate(adapter)}); measured on a probe batch of "
          f"{PROBE_SHAPE[0]}x{PROBE_SHAPE[1]} tokens with block rule {rules[0]!r}: "
          f"effect error {kept['effect_error']:.6e}, logit error {kept['logit_error']:.6e}")
    return 0


def _measure_rules(adapter, base, args, rules) -> dict[str, dict[str, float]]:
    """Errors of the additive conversion under each block rule (the multiplicative form merges to the same weights)."""
    reference = reference_logits(str(base.path), args.adapter_dir, args.direction, args.strength)
    errors = {}
    for rule in rules:
        with tempfile.TemporaryDirectory() as scratch:
            write_lora(additive_updates(adapter, base, args.direction, args.strength, rule), Path(scratch),
                       str(base.path))
            errors[rule] = lora_errors(str(base.path), scratch, *reference)
    return errors


def _why_approximate(adapter) -> str:
    if adapter.family.norm_after_sublayer:
        return f"{adapter.family.name} normalises each sublayer output before the residual add"
    return "target 'block' on a sequential block: the MLP reads the attention write"


def probe_input_ids(vocab_size: int) -> torch.Tensor:
    """The fixed probe batch: token ids uniform in [4, vocab_size) (skipping the usual special ids), seed 0."""
    generator = torch.Generator().manual_seed(PROBE_SEED)
    return torch.randint(min(4, vocab_size - 1), vocab_size, PROBE_SHAPE, generator=generator)


def _load_base(base_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager").eval()


@torch.no_grad()
def reference_logits(base_dir: str, adapter_dir: str, direction: int = 1, strength: float = 1.0):
    """(probe ids, base logits L0, base + Control Adapter logits La) on the probe batch."""
    from craft.adapters import control_class, load_control_adapter

    model = _load_base(base_dir)
    ids = probe_input_ids(model.config.vocab_size)
    base_logits = model(input_ids=ids).logits
    load_control_adapter(model, adapter_dir)
    with control_class(model, value=direction, strength=strength):
        return ids, base_logits, model(input_ids=ids).logits


@torch.no_grad()
def lora_errors(base_dir: str, lora_dir: str, ids, base_logits, adapter_logits) -> dict[str, float]:
    """Effect error and logit error (module docstring) of the PEFT LoRA in `lora_dir`."""
    from peft import PeftModel

    lora_logits = PeftModel.from_pretrained(_load_base(base_dir), lora_dir).eval()(input_ids=ids).logits
    miss = (lora_logits - adapter_logits).norm()
    return {"effect_error": float(miss / (adapter_logits - base_logits).norm()),
            "logit_error": float(miss / adapter_logits.norm())}


def measure_logits_error(base_dir: str, adapter_dir: str, lora_dir: str, direction: int = 1,
                         strength: float = 1.0) -> dict[str, float]:
    """Errors of a converted LoRA against the Control Adapter on the probe batch (definitions in module doc)."""
    return lora_errors(base_dir, lora_dir, *reference_logits(base_dir, adapter_dir, direction, strength))
