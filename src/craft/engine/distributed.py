"""Process-group setup and the pipeline x data-parallel topology.

`craft train` works the same whether it is started alone (a world of one process is set up here: MASTER_ADDR,
MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK are filled in when absent), by `torchrun --nproc_per_node N -m craft
train ...`, or by the `deepspeed` launcher. The backend is gloo on CPU and nccl on CUDA.

Topology. The world is `pipeline_stages x replicas` processes. By default (DeepSpeed's
`PipeDataParallelTopology`, axes `['pipe', 'data']`) the data axis varies fastest: consecutive ranks hold the
same stage of different replicas, so the gradient all-reduce stays between neighbouring ranks (e.g. within a
node) and activations cross between rank groups. With `use_column_major_topology = true` the axes are
`['data', 'pipe']`: consecutive ranks hold consecutive stages of one replica, so the high-volume hidden states
travel between neighbours (PCIe/NVLink within a node) and only the small LoRA gradient all-reduce crosses nodes.
"""

from __future__ import annotations

import contextlib
import os
import socket

import torch
import torch.distributed as dist

from craft.errors import UserError


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def distributed_world():
    """Yields (rank, world_size) inside the default process group.

    If no group exists yet, one is created (from the launcher's environment, or a world of one with the missing
    variables filled in) and, on exit, destroyed and the environment restored — so a Python caller can run
    `craft train` several times in one process without leaving a process group or env variables behind.
    """
    import deepspeed

    created, added = False, []
    if not dist.is_initialized():
        defaults = {"MASTER_ADDR": "127.0.0.1", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                    "MASTER_PORT": None}
        for key, value in defaults.items():
            if key not in os.environ:
                os.environ[key] = value if value is not None else str(_free_port())
                added.append(key)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
        created = True
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        if created:
            dist.destroy_process_group()
            for key in added:
                os.environ.pop(key, None)


def make_topology(num_stages: int, world_size: int, column_major: bool):
    """The DeepSpeed process topology for `num_stages` pipeline stages over `world_size` processes."""
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology, ProcessTopology

    if world_size % num_stages:
        raise UserError(f"pipeline_stages={num_stages} must evenly divide the number of processes ({world_size})")
    replicas = world_size // num_stages
    if column_major:
        return ProcessTopology(axes=["data", "pipe"], dims=[replicas, num_stages])
    return PipeDataParallelTopology(num_pp=num_stages, num_dp=replicas)


def stage_and_replica(topology, rank: int) -> tuple[int, int]:
    coord = topology.get_coord(rank)
    return coord.pipe, coord.data


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather_to_zero(obj):
    """Every rank's `obj` as a list on rank 0 (None elsewhere); plain pickled objects over the default group."""
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_from_zero(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree_on_errors(fn):
    """Run `fn` on every rank (work that is local to each rank, with no collective inside); if it raises a
    `UserError` on any rank, every rank raises the lowest failing rank's error, so all ranks fail alike (and
    rank 0, the one that prints, names the problem even when another rank found it)."""
    result, error = None, None
    try:
        result = fn()
    except UserError as err:
        error = str(err)
    errors = all_gather(error) if dist.is_initialized() and dist.get_world_size() > 1 else [error]
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise UserError(first)
    return result


def run_on_zero(fn, rank: int):
    """Run `fn` on rank 0 only; every rank gets its result, or raises the `UserError` it raised (so no rank is
    left waiting at a barrier when rank 0 finds a problem in the user's input)."""
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except UserError as err:
            error = str(err)
    result, error = broadcast_from_zero((result, error))
    if error is not None:
        raise UserError(error)
    return result
