"""`craft train`'s CPU allocator settings (craft.engine.allocator): with them, glibc serves a block of 1 MiB or more
by mmap even after a larger block was freed (the dynamic threshold would have moved it to the heap, where freed
memory stays resident). Each case runs in a fresh interpreter: the settings are process-wide and irreversible."""

import json
import os
import subprocess
import sys

import pytest

from craft.engine import allocator

pytestmark = pytest.mark.skipif(allocator._glibc() is None, reason="needs Linux with glibc")

PROBE = """
import ctypes, json, torch
from craft.engine.allocator import configure_cpu_allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                               "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
configured = configure_cpu_allocator()
freed = torch.empty(16 << 20, dtype=torch.uint8)
del freed  # freeing a 16 MiB mmapped block raises glibc's dynamic threshold
before = libc.mallinfo2().hblkhd
block = torch.empty(4 << 20, dtype=torch.uint8)
print(json.dumps({"configured": configured, "mmapped": libc.mallinfo2().hblkhd - before}))
"""


def probe(**env) -> dict:
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "THP_MEM_ALLOC_ENABLE": "0", **env}
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=environ, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_large_blocks_stay_mmapped_after_a_larger_one_was_freed():
    tuned = probe()
    assert tuned["configured"] and tuned["mmapped"] >= 4 << 20
    untouched = probe(CRAFT_CPU_ALLOCATOR="default")
    assert not untouched["configured"] and untouched["mmapped"] == 0  # glibc's dynamic threshold: from the heap


def test_huge_pages_are_requested_only_before_torch_is_imported(monkeypatch):
    import torch  # noqa: F401

    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    allocator.request_huge_pages()  # torch is imported in this test process: too late, nothing set
    assert "THP_MEM_ALLOC_ENABLE" not in os.environ
    code = ("import os, sys; from craft.engine.allocator import request_huge_pages; request_huge_pages(); "
            "print(os.environ.get('THP_MEM_ALLOC_ENABLE'))")
    environ = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    environ["PYTHONPATH"] = os.pathsep.join(sys.path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, check=True)
    assert out.stdout.strip() == "1"
