"""The `craft` command: one entry point, subcommands routed to the module that implements each.

Each subcommand module exposes `add_arguments(parser)` and `run(args) -> int`. A `UserError` anywhere becomes one
line on stderr and exit status 2; Ctrl-C (KeyboardInterrupt) is one line `craft COMMAND: interrupted` (plus the
subcommand's `INTERRUPTED_HINT`, e.g. how to resume) and exit status 130, the shell's code for SIGINT; nothing else
is caught, so real bugs keep their traceback. In a multi-process
launch (`torchrun`, `deepspeed`: the environment has RANK) every process exits with status 2 but only rank 0
prints the line, and the launcher's failure report names it (`craft.errors.report_error`): the engine makes all
ranks fail with the same error (see `craft.engine.distributed`).

`--verbose` (any subcommand) lets third-party libraries print their informational output (`craft.quiet`).
The `deepspeed` launcher inserts `--local_rank=N` before the subcommand; it is dropped (LOCAL_RANK is read from
the environment, which the launcher also sets).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from craft.errors import UserError, is_rank_zero, report_error
from craft.quiet import silence_loggers

INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what shells report for a command ended by Ctrl-C

# subcommand -> (module, one-line help). Modules are imported only when their subcommand runs.
SUBCOMMANDS = {
    "train": ("craft.engine.cli", "train a Control Adapter / LoRA / QLoRA / full fine-tune from a TOML config"),
    "plan": ("craft.engine.plan", "predict per-stage GPU memory of a `craft train` config (reads no weights)"),
    "convert": ("craft.export.convert", "convert a Control Adapter into a PEFT LoRA"),
    "merge": ("craft.export.merge", "merge a LoRA or Control Adapter into the base weights, shard by shard"),
    "export-gguf": ("craft.export.gguf_export", "write a llama.cpp LoRA adapter GGUF"),
    "inspect": ("craft.export.inspect", "per-layer norms and Neumann margin of a Control Adapter"),
}


def _load(module_name: str):
    return importlib.import_module(module_name)


def _drop_local_rank(argv: list[str]) -> list[str]:
    """argv without the launcher's `--local_rank=N` / `--local_rank N`."""
    out, skip = [], False
    for index, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg.startswith("--local_rank="):
            continue
        elif arg == "--local_rank" and index + 1 < len(argv) and argv[index + 1].isdigit():
            skip = True
        else:
            out.append(arg)
    return out


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one line too (argparse would print the whole usage first); `--help` shows the usage."""

    def error(self, message):
        self.exit(UserError.exit_code, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; `argv` None means the program's own arguments (the `craft` command, `python -m craft`)."""
    code = _run_subcommand(sys.argv[1:] if argv is None else list(argv))
    if argv is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from craft.shutdown import end_launched_process

        end_launched_process(code)  # a launched process leaves without Python's finalization (craft.shutdown)
    return code


def _run_subcommand(argv: list[str]) -> int:
    argv = _drop_local_rank(argv)
    silence_loggers(verbose="--verbose" in argv)
    parser = _Parser(prog="craft", description="contrastive and steering fine-tuning")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = argv[0] if argv else None
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.add_argument("--verbose", action="store_true",
                                help="show the informational output of third-party libraries")
        if name == chosen:
            _load(module_name).add_arguments(sub_parser)
    args = parser.parse_args(argv)
    try:
        return int(_load(SUBCOMMANDS[args.command][0]).run(args) or 0)
    except UserError as err:
        report_error(f"craft {args.command}: error: {err}")
        return UserError.exit_code
    except KeyboardInterrupt:
        if is_rank_zero():
            hint = getattr(_load(SUBCOMMANDS[args.command][0]), "INTERRUPTED_HINT", "")
            newline = "\n" if sys.stderr.isatty() else ""  # leave a progress bar's line intact
            print(f"{newline}craft {args.command}: interrupted{'; ' + hint if hint else ''}", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
