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
the logits the LoRA gets wrong) and `logit error = ‖Ll − La‖_F / ‖La‖_F`.

`--mode multiplicative` writes the seed's multiplicative form instead: per projection, factors (A (r × hidden),
B (hidden × r)) with `P' = P + B·A·P`, for `craft merge --multiplicative`; it needs no base weights.
"""

from __future__ import annotations

import argparse
import math

import torch

from craft.errors import UserError
from craft.export.control import additive_updates, base_dir_for, projection_updates, read_control_adapter_file
from craft.export.lora import write_lora
from craft.export.output import staged_directory

PROBE_SHAPE = (4, 32)
PROBE_SEED = 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter_dir", help="Control Adapter directory (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("out_dir", help="output directory for the LoRA")
    parser.add_argument("--direction", type=int, choices=(1, -1), default=1,
                        help="convert the class +1 transform (I+W) or the class -1 transform (I+W)^-1")
    parser.add_argument("--strength", type=float, default=1.0, help="scale W by this factor (W -> X*W)")
    parser.add_argument("--base", default=None, help="base model directory (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--mode", choices=("additive", "multiplicative"), default="additive",
                        help="additive: PEFT LoRA; multiplicative: factors of (I+W) for `craft merge --multiplicative`")
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")


def run(args: argparse.Namespace) -> int:
    if not math.isfinite(args.strength):
        raise UserError(f"--strength must be a finite number, got {args.strength}")
    adapter = read_control_adapter_file(args.adapter_dir)
    base = base_dir_for(adapter, args.base)
    if args.mode == "multiplicative":
        updates = {name: update.folded()
                   for name, update in projection_updates(adapter, base, args.direction, args.strength).items()}
    else:
        updates = additive_updates(adapter, base, args.direction, args.strength)
    with staged_directory(args.out_dir, args.force) as staging:
        write_lora(updates, staging, str(base.path), multiplicative=args.mode == "multiplicative")
    rank = next(iter(updates.values())).rank
    print(f"wrote {args.mode} LoRA to {args.out_dir}: {len(updates)} projections in {len(adapter.layers)} layers, "
          f"rank {rank}, direction {args.direction:+d}, strength {args.strength:g}")
    if adapter.exact:
        print("conversion is exact (sublayer target without a post-sublayer norm, or a parallel block)")
    elif args.mode == "multiplicative":
        print("note: this conversion is an approximation (block target on a sequential block, or a norm after "
              "the sublayer); run the additive conversion to measure its error, which is identical")
    else:
        errors = measure_logits_error(str(base.path), args.adapter_dir, args.out_dir, args.direction, args.strength)
        print(f"conversion is approximate ({_why_approximate(adapter)}); measured on a probe batch of "
              f"{PROBE_SHAPE[0]}x{PROBE_SHAPE[1]} tokens: effect error {errors['effect_error']:.6e}, "
              f"logit error {errors['logit_error']:.6e}")
    return 0


def _why_approximate(adapter) -> str:
    if adapter.family.norm_after_sublayer:
        return f"{adapter.family.name} normalises each sublayer output before the residual add"
    return "target 'block' on a sequential block: the MLP reads the transformed attention output"


def probe_input_ids(vocab_size: int) -> torch.Tensor:
    """The fixed probe batch: token ids uniform in [4, vocab_size) (skipping the usual special ids), seed 0."""
    generator = torch.Generator().manual_seed(PROBE_SEED)
    return torch.randint(min(4, vocab_size - 1), vocab_size, PROBE_SHAPE, generator=generator)


@torch.no_grad()
def measure_logits_error(base_dir: str, adapter_dir: str, lora_dir: str, direction: int = 1,
                         strength: float = 1.0) -> dict[str, float]:
    """Errors of a converted LoRA against the Control Adapter on the probe batch (definitions in module doc)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from craft.adapters import control_class, load_control_adapter

    def load_base():
        return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager").eval()

    model = load_base()
    ids = probe_input_ids(model.config.vocab_size)
    base_logits = model(input_ids=ids).logits
    load_control_adapter(model, adapter_dir)
    with control_class(model, value=direction, strength=strength):
        adapter_logits = model(input_ids=ids).logits
    del model
    lora_logits = PeftModel.from_pretrained(load_base(), lora_dir).eval()(input_ids=ids).logits
    miss = (lora_logits - adapter_logits).norm()
    return {"effect_error": float(miss / (adapter_logits - base_logits).norm()),
            "logit_error": float(miss / adapter_logits.norm())}
