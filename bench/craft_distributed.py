"""Memory per rank of CRAFT training on 2 ranks under DDP, DeepSpeed ZeRO-2 and ZeRO-3 (one run, CPU).

    .venv/bin/python bench/craft_distributed.py

Each engine trains the same model (Llama, hidden 512, 4 layers, vocab 8192: 17.8 M parameters, float32, AdamW)
with CRAFT self-align on 2 CPU processes (gloo; DeepSpeed's CPU accelerator), one `torchrun` launch per engine
so that nothing of one engine's run is counted in another's (bench/craft_distributed_worker.py). Per rank:

* model state = bytes of every distinct tensor storage alive at the start of the third optimizer step
  (parameters or their shards, AdamW's two moments, gradient and partition buffers);
* peak = model state + the peak of torch's CPU allocator during that step (activations, gradients, optimizer
  temporaries).

Claims: ZeRO-3 model state per rank <= 0.6 x DDP's (2 ranks shard parameters, gradients and optimizer states:
ideally 0.5x); ZeRO-2 (optimizer states and gradients sharded, parameters replicated) is reported. Both ranks are
measured; the table shows the larger. FSDP2 is not measured: accelerate enables FSDP on GPUs and other
accelerators only (on CPU it would run DDP; CRAFT refuses that, see craft.engines).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).with_name("craft_distributed_worker.py")
ENGINES = ("ddp", "zero2", "zero3")
MIB = 2 ** 20


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(engine: str, out: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TRANSFORMERS_VERBOSITY": "error", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), str(WORKER), out, engine]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"{engine} failed:\n{proc.stderr[-4000:]}")
    ranks = [json.loads((Path(out) / f"{engine}-rank{r}.json").read_text()) for r in (0, 1)]
    return {key: max(rank[key] for rank in ranks) for key in ("held", "peak")}


def main() -> None:
    with tempfile.TemporaryDirectory() as out:
        results = {engine: measure(engine, out) for engine in ENGINES}
    print(f"{'engine':8s} {'model state / rank':>20s} {'peak / rank':>14s}")
    for engine, result in results.items():
        print(f"{engine:8s} {result['held'] / MIB:17.1f} MiB {result['peak'] / MIB:11.1f} MiB")
    ddp = results["ddp"]
    for engine, goal in (("zero2", ""), ("zero3", "<= 0.6")):
        result = results[engine]
        detail = (f"{result['held'] / MIB:.1f} vs {ddp['held'] / MIB:.1f} MiB per rank; peak {result['peak'] / MIB:.1f}"
                  f" vs {ddp['peak'] / MIB:.1f} MiB; 17.8 M-param Llama, AdamW fp32, 2 CPU ranks, self-align")
        report(f"CRAFT {engine} / DDP model-state memory per rank", result["held"] / ddp["held"], goal, detail)


if __name__ == "__main__":
    main()
