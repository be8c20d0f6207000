"""Model-state memory per rank of CRAFT full fine-tuning on 2 ranks: DDP, DeepSpeed ZeRO-2 / ZeRO-3, FSDP2 (one run).

    .venv/bin/python bench/craft_distributed.py

Each engine fully fine-tunes the same model (Llama, hidden 512, 4 layers, vocab 8192: 17.8 M parameters and the
objective's 0.3 M, float32, AdamW) with CRAFT self-align on 2 CPU processes (gloo; DeepSpeed's CPU accelerator;
FSDP2 through accelerate's plugin, which CRAFT enables on CPU, `craft.engines`), one `torchrun` launch per engine
so that nothing of one engine's run is counted in another's (bench/craft_distributed_worker.py). Per rank, right
before the optimizer update of the third step (gradients reduced, activations freed):

* model state = bytes of every distinct tensor storage alive in the process: parameters or their shards, gradients
  or their partitions, optimizer states, DeepSpeed's fp32 master partitions and buckets, DDP's gradient buckets
  (held by C++; their sizes from DDP's logging data);
* of which parameters (the shard this rank stores) and optimizer states (AdamW's moments or their partitions);
* peak RSS = the process's peak resident set size (``ru_maxrss``), everything included (Python, torch, the
  tokenizer, activations, allocator caches).

Theory (bytes per parameter per rank, fp32 AdamW, N ranks): DDP 4 weights + 4 gradients + 4 gradient buckets + 8
moments = 20 (16 with ``gradient_as_bucket_view``, which transformers' Trainer does not set); ZeRO-2 4 + (4 fp32 master + 4 gradients + 8) / N;
ZeRO-3 (4 + 4 + 4 + 8) / N = 20 / N (DeepSpeed keeps an fp32 master partition even of fp32 weights) plus the
persistent small parameters in full; ZeRO-3 with bf16 mixed precision (as on a GPU; `zero3_bf16`: bf16 weights and
gradients, fp32 master and moments) (2 + 4 + 2 + 8) / N = 16 / N; FSDP2 16 / N. DDP with bf16 autocast keeps fp32
weights: 20 as well. Claim: ZeRO-3 and FSDP2 model state per rank <= 0.6 x DDP's at 2 ranks (theory: 0.5 for
ZeRO-3 in fp32, 0.4 with bf16, FSDP2 0.4; against a DDP with gradients as bucket views, 16: 0.625, 0.5, 0.5). Both ranks are measured; the table shows the larger.
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
ENGINES = ("ddp", "zero2", "zero3", "zero3_bf16", "fsdp2")
KEYS = ("held", "buckets", "params", "optimizer", "peak_rss")
# Theoretical model-state bytes per parameter per rank at N = 2 (module docstring).
THEORY = {"ddp": 20, "zero2": 4 + 16 / 2, "zero3": 20 / 2, "zero3_bf16": (2 + 4 + 2 + 8) / 2, "fsdp2": 16 / 2}
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
    return {**{key: max(rank[key] for rank in ranks) for key in KEYS}, "parameters": ranks[0]["parameters"]}


def main() -> None:
    with tempfile.TemporaryDirectory() as out:
        results = {engine: measure(engine, out) for engine in ENGINES}
    count = results["ddp"]["parameters"]
    print(f"{count / 1e6:.1f} M parameters; per rank, the larger of the 2 ranks (MiB):")
    print(f"{'engine':10s} {'model state':>12s} {'B/param':>8s} {'theory':>7s} {'params':>8s} {'optimizer':>10s} "
          f"{'peak RSS':>9s}")
    for engine, r in results.items():
        print(f"{engine:10s} {r['held'] / MIB:12.1f} {r['held'] / count:8.2f} {THEORY[engine]:7.2f} "
              f"{r['params'] / MIB:8.1f} {r['optimizer'] / MIB:10.1f} {r['peak_rss'] / MIB:9.1f}")
    ddp = results["ddp"]
    for engine, goal in (("zero2", ""), ("zero3", "<= 0.6"), ("zero3_bf16", "<= 0.6"), ("fsdp2", "<= 0.6")):
        r = results[engine]
        detail = (f"{r['held'] / MIB:.1f} vs {ddp['held'] / MIB:.1f} MiB per rank ({r['held'] / count:.2f} vs "
                  f"{ddp['held'] / count:.2f} B/param; theory {THEORY[engine]:.0f} vs 20 = "
                  f"{THEORY[engine] / 20:.3f}; vs DDP without its buckets {r['held'] / (ddp['held'] - ddp['buckets']):.3f}); peak RSS {r['peak_rss'] / MIB:.0f} vs {ddp['peak_rss'] / MIB:.0f} MiB; "
                  f"{count / 1e6:.1f} M-param Llama, full FT, AdamW, "
                  f"{'bf16 mixed precision' if engine.endswith('bf16') else 'fp32'}, 2 CPU ranks, self-align")
        report(f"CRAFT {engine} / DDP model-state memory per rank", r["held"] / ddp["held"], goal, detail)


if __name__ == "__main__":
    main()
