"""The end of a process in a multi-process launch (torchrun, `deepspeed`, `accelerate launch`).

DeepSpeed (and the engines accelerate wraps) keep process groups alive past `destroy_process_group`: a 2-rank
`craft train` ends with five groups' gloo worker threads still running, and nothing joins them. One of them still
releasing the last collective's tensors while Python finalizes needs the GIL; Python then ends that thread from
inside a C++ frame ("terminate called without an active exception"), the process aborts with SIGABRT and the
launcher kills the other ranks, after a run that finished and wrote everything. It happened to 1 launch in 4 of
the accelerate example on a loaded 2-core machine. So a launched process that is done leaves without Python's
finalization, once its files are closed and its output is flushed.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

import torch.distributed as dist


def end_launched_process(status: int = 0) -> NoReturn:
    """Leave this process with `status`, skipping Python's finalization (module docstring).

    With a process group still initialized and status 0, every rank first meets at a barrier (so no rank leaves
    while another still needs it) and the group is destroyed; after a failure there is no barrier, since the other
    ranks may never arrive. Call it last: open files are not flushed and atexit handlers do not run.
    """
    if dist.is_initialized():
        if status == 0:
            dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
