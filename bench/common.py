"""Shared by every benchmark: how a result is reported, and what machine it ran on.

A benchmark prints human-readable lines as it goes and, for each claim, one machine-readable line

    RESULT {"what": "...", "ratio": 1.07, "goal": "<= 1.1", "detail": "..."}

which `bench/run_all.py` collects into BENCHMARKS.md together with the command and the machine.
"""

from __future__ import annotations

import json
import os
import platform


def report(what: str, ratio: float, goal: str = "", detail: str = "") -> None:
    print("RESULT " + json.dumps({"what": what, "ratio": round(float(ratio), 3), "goal": goal, "detail": detail}),
          flush=True)


def machine() -> str:
    """One line: CPU model and cores (or the GPU), torch version."""
    import torch

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        model = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        device = f"{model}, {os.cpu_count()} cores"
    return f"{device}, torch {torch.__version__}"


def allocated_peak_bytes(region) -> int:
    """Peak of the bytes held by torch's CPU allocator during `region()`, above what was held before it: the running
    sum of every allocation and free the profiler records (its `[memory]` records, in time order).

    (Summing the ops' `self_cpu_memory_usage` in the order the ops start books a free made by an enclosing op, e.g. a
    custom autograd function freeing its chunk's logits, before the allocations of the ops inside it: the chunked
    loss's peak read 4 MB instead of 133 MB that way.)"""
    from torch._C._autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        region()
    records = sorted((event.start_ns(), event.nbytes()) for event in prof.profiler.kineto_results.events()
                     if event.name() == "[memory]" and event.device_type() == DeviceType.CPU)
    running = peak = 0
    for _, nbytes in records:
        running += nbytes
        peak = max(peak, running)
    return peak
