"""`craft train CONFIG.toml [--set key=value ...] [--resume_from_checkpoint [CHECKPOINT]]`.

One process by itself (a world of one is set up), or many under `torchrun --nproc_per_node N -m craft train ...`
or `deepspeed --num_gpus N --module craft train ...` (whose `--local_rank=N` argument `craft.cli` drops).
"""

from __future__ import annotations

import argparse

# Printed after `craft train: interrupted` on Ctrl-C (craft.cli): checkpoints are written whole or not at all.
INTERRUPTED_HINT = ("the same command with --resume_from_checkpoint continues from the newest complete checkpoint "
                    "(written every checkpoint_interval_hours and at each epoch end)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="TOML training config (see docs/training.md)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a top-level config key (value in TOML syntax, or a bare string); repeatable")
    parser.add_argument("--resume_from_checkpoint", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                        help="resume from the newest checkpoint under output_dir, or from the given directory")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from craft.engine.allocator import request_huge_pages

    request_huge_pages()  # before torch is imported: see craft.engine.allocator
    from craft.engine.config import load_config
    from craft.engine.train import train

    config = load_config(args.config, args.overrides)
    summary = train(config, resume=args.resume_from_checkpoint, show_progress=not args.no_progress,
                    verbose=args.verbose)
    if summary["rank"] == 0:
        print(format_summary(summary))
    return 0


def format_summary(summary: dict) -> str:
    """The end-of-run report: steps, tokens, time, final losses, where things were written."""
    def loss(value):
        return "n/a" if value is None else f"{value:.4f}"

    return "\n".join([
        f"craft train: finished {summary['steps']} steps ({summary['mode']}), {summary['tokens']:,} tokens in "
        f"{summary['seconds']:.1f} s",
        f"  final train loss {loss(summary['final_train_loss'])}, eval loss {loss(summary['final_eval_loss'])}",
        f"  output:      {summary['output']}",
        f"  run dir:     {summary['run_dir']} (checkpoints/, tensorboard/, losses.jsonl)",
    ])
