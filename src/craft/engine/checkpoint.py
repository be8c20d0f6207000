"""Training checkpoints: atomic, pruned to `max_checkpoints`, and complete enough to resume bit-for-bit.

Layout under the run directory `output_dir/<run>/`:
  checkpoints/step000012/rank00000.pt   one file per process: trainable tensors of its stage, optimizer state,
                                         RNG states (torch, python, numpy)
  checkpoints/step000012/meta.json      global state: step, epoch, step within the epoch, tokens, world layout
Writing goes to `checkpoints/.tmp-step000012/`; every rank fsyncs its file, all ranks meet at a barrier, then
rank 0 writes meta.json, fsyncs, renames the directory to its final name (atomic on POSIX) and prunes the oldest
complete checkpoints beyond `max_checkpoints`. A crash at any point leaves either the previous checkpoints only
(plus a `.tmp-*` directory that the next run removes) or the new complete one. The LR schedule is a function of
the step, so restoring the step restores the scheduler.

For tests, the environment variable `CRAFT_KILL_IN_CHECKPOINT=<step>` makes rank 0 SIGKILL itself after the
rank files of that step's checkpoint are written and before the rename.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import torch

from craft.engine.distributed import barrier
from craft.errors import UserError


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_name(step: int) -> str:
    return f"step{step:09d}"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step") and (p / "meta.json").is_file())


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """name -> tensor of the parameters that require grad (what training changes)."""
    return {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir: Path, step: int, rank: int, module, optimizer, meta: dict, max_checkpoints: int) -> Path:
    """Collectively write the checkpoint of `step` (see the module docstring); returns its final path."""
    root = run_dir / "checkpoints"
    name = checkpoint_name(step)
    tmp, final = root / f".tmp-{name}", root / name
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    state = {
        "model": trainable_state(module),
        "optimizer": optimizer.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
    }
    rank_file = tmp / f"rank{rank:05d}.pt"
    torch.save(state, rank_file)
    _fsync_file(rank_file)
    barrier()
    if rank == 0:
        if os.environ.get("CRAFT_KILL_IN_CHECKPOINT") == str(step):
            os.kill(os.getpid(), signal.SIGKILL)
        meta_file = tmp / "meta.json"
        meta_file.write_text(json.dumps(meta, indent=2))
        _fsync_file(meta_file)
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in complete_checkpoints(run_dir)[:-max_checkpoints]:
            shutil.rmtree(old)
    barrier()
    return final


def remove_partial_checkpoints(run_dir: Path) -> None:
    """Delete `.tmp-*` leftovers of a checkpoint write that was interrupted."""
    root = run_dir / "checkpoints"
    if root.is_dir():
        for leftover in root.glob(".tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)


def read_meta(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "meta.json").read_text())


def load_checkpoint(checkpoint: Path, rank: int, module, optimizer, world_layout: dict) -> dict:
    """Restore this rank's trainable tensors, optimizer state and RNG from `checkpoint`; returns its meta."""
    meta = read_meta(checkpoint)
    if meta["layout"] != world_layout:
        raise UserError(f"checkpoint {checkpoint} was written with {meta['layout']}; this run has {world_layout} "
                        f"(resume with the same number of processes and pipeline_stages)")
    state = torch.load(checkpoint / f"rank{rank:05d}.pt", weights_only=False)
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, tensor in state["model"].items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    return meta
