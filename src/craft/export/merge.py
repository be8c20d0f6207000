"""`craft merge BASE_DIR ADAPTER_DIR OUT_DIR`: bake a LoRA or a Control Adapter into the base weights, shard by shard.

Accepted adapters: a PEFT LoRA (`W' = W + scale·B·A`), a Control Adapter (converted on the fly: each residual
projection P becomes `T·P`, see `craft.export.control`; `--direction` / `--strength` / `--block-rule` as in
`craft convert`, except that the block rule is not measured here: default "mlp"), or a
multiplicative LoRA written by `craft convert --mode multiplicative` (`W' = W + scale·B·A·W`, needs
`--multiplicative`).

Memory: one shard at a time, and within a shard one tensor at a time — each tensor is read with plain file reads
(`checkpoint.read_stored`, no memory map), updated in float32, cast back to its dtype and streamed to the output
file (`checkpoint.write_safetensors`), so the peak is the adapter plus a few copies of the largest tensor, never
the model or even a whole shard. Shard names and the index json are
kept; every other top-level file of the base (config, generation config, tokenizer, chat template, ...) is copied.
The output is written to a temporary sibling directory and renamed into place when complete; a non-empty OUT_DIR
is refused unless `--force`.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from craft.errors import UserError
from craft.export.checkpoint import BaseCheckpoint, read_stored, shard_entries, write_safetensors
from craft.export.control import (DEFAULT_BLOCK_RULE, add_control_options, projection_updates,
                                  read_control_adapter_file, warn_if_approximate)
from craft.export.lora import LowRankUpdate, adapter_kind, read_lora
from craft.export.output import staged_directory

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base_dir", help="base model directory (safetensors, optionally sharded)")
    parser.add_argument("adapter_dir", help="PEFT LoRA, Control Adapter, or multiplicative LoRA directory")
    parser.add_argument("out_dir", help="output model directory")
    parser.add_argument("--multiplicative", action="store_true",
                        help="the adapter is a multiplicative LoRA (craft convert --mode multiplicative)")
    add_control_options(parser)
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")


def run(args: argparse.Namespace) -> int:
    merged = merge(args.base_dir, args.adapter_dir, args.out_dir, multiplicative=args.multiplicative,
                   direction=args.direction, strength=args.strength, block_rule=args.block_rule, force=args.force)
    print(f"merged {args.adapter_dir} into {merged} tensors of {args.base_dir}; wrote {args.out_dir}")
    return 0


def load_updates(base: BaseCheckpoint, adapter_dir: str | Path, multiplicative: bool = False, direction: int = 1,
                 strength: float = 1.0, block_rule: str = DEFAULT_BLOCK_RULE) -> dict[str, LowRankUpdate]:
    """The adapter's updates keyed by in-memory base tensor name, whatever kind of adapter it is."""
    kind, _ = adapter_kind(adapter_dir)
    if kind == "multiplicative" and not multiplicative:
        raise UserError(f"{adapter_dir} is a multiplicative LoRA; merge it with --multiplicative")
    if kind == "lora" and multiplicative:
        raise UserError(f"{adapter_dir} is an additive PEFT LoRA; --multiplicative applies to multiplicative LoRAs "
                        "(craft convert --mode multiplicative)")
    if kind != "control":
        return read_lora(adapter_dir)
    adapter = read_control_adapter_file(adapter_dir)
    warn_if_approximate(adapter, block_rule)
    return projection_updates(adapter, base, direction, strength, block_rule)


def merge(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, multiplicative: bool = False,
          direction: int = 1, strength: float = 1.0, block_rule: str = DEFAULT_BLOCK_RULE, force: bool = False) -> int:
    """Write the merged model to `out_dir`; returns the number of stored tensors that changed."""
    base = BaseCheckpoint.open(base_dir)
    if Path(out_dir).resolve() == base.path.resolve():
        raise UserError(f"output {out_dir} is the base model directory; choose another OUT_DIR")
    kind, adapter_config = adapter_kind(adapter_dir)
    if kind != "control":  # a Control Adapter is checked where its updates are built (projection_updates)
        base.check_adapter(Path(adapter_dir), adapter_config)
    updates = load_updates(base, adapter_dir, multiplicative, direction, strength, block_rule)
    plan: dict[str, list[LowRankUpdate]] = {}
    for name, update in updates.items():
        for piece in base.locate(name):
            plan.setdefault(piece.key, []).append(update.piece(piece.expert, piece.rows))
    with staged_directory(out_dir, force) as staging:
        for item in base.path.iterdir():
            if item.is_file() and not item.name.endswith(_WEIGHT_SUFFIXES):
                shutil.copy2(item, staging / item.name)
        for shard in base.shards:
            _merge_shard(base.path / shard, staging / shard, plan)
    return len(plan)


def _merge_shard(source: Path, target: Path, plan: dict[str, list[LowRankUpdate]]) -> None:
    entries, metadata = shard_entries(source)
    by_name = {entry.name: entry for entry in entries}
    with open(source, "rb") as handle:
        def produce(name):
            tensor = read_stored(handle, by_name[name])
            for update in plan.get(name, ()):
                tensor = update.apply(tensor)
            return tensor

        write_safetensors(target, entries, produce, metadata)
