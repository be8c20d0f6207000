"""The `craft` command: one entry point, subcommands routed to the module that implements each.

Each subcommand module exposes `add_arguments(parser)` and `run(args) -> int`. A `UserError` anywhere becomes one
line on stderr and exit status 2; nothing else is caught, so real bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from craft.errors import UserError

# subcommand -> (module, one-line help). Modules are imported only when their subcommand runs.
SUBCOMMANDS = {
    "train": ("craft.engine.cli", "train a Control Adapter / LoRA / QLoRA / full fine-tune from a TOML config"),
    "convert": ("craft.export.convert", "convert a Control Adapter into a PEFT LoRA"),
    "merge": ("craft.export.merge", "merge a LoRA or Control Adapter into the base weights, shard by shard"),
    "export-gguf": ("craft.export.gguf_export", "write a llama.cpp LoRA adapter GGUF"),
    "inspect": ("craft.export.inspect", "per-layer norms and Neumann margin of a Control Adapter"),
}


def _load(module_name: str):
    return importlib.import_module(module_name)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="craft", description="contrastive and steering fine-tuning")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = argv[0] if argv else None
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            _load(module_name).add_arguments(sub_parser)
    args = parser.parse_args(argv)
    try:
        return int(_load(SUBCOMMANDS[args.command][0]).run(args) or 0)
    except UserError as err:
        print(f"craft {args.command}: error: {err}", file=sys.stderr)
        return UserError.exit_code


if __name__ == "__main__":
    sys.exit(main())
