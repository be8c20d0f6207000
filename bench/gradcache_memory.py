"""Peak memory and step time of one contrastive step, contrastive batch 8 / 32 / 128 / 512, with and without GradCache.

    .venv/bin/python bench/gradcache_memory.py                      # CPU (or the GPU when CUDA is available)
    .venv/bin/python bench/gradcache_memory.py --hidden 256 --layers 4 --seq-len 128 --repeats 3  # bigger

Step times are CUDA wall time, or on CPU the process's CPU time with one thread (robust on a shared machine).

One step = InfoNCE over B anchors and B positives (2B sequences through a tiny random Llama, last-token pooling,
projection head, learnable temperature) and its backward into every parameter. "plain" runs the 2B sequences in
one forward with one graph; "gradcache" uses `craft.gradcache.gradcache_backward` with chunks of
``--chunk`` sequences. Each (mode, batch) runs in its own process, so peaks do not leak between measurements:

* CUDA: ``torch.cuda.max_memory_allocated()`` during the step minus the memory allocated before it.
* CPU: the peak resident set size (VmHWM, reset through /proc/self/clear_refs) during the step minus the
  resident size before it. The first step of the fresh process is the one measured (gradients allocated
  beforehand), so its allocations cannot be served from memory an earlier step left resident; allocations
  below glibc's mmap threshold can still reuse heap memory freed while the model was built, which makes small
  peaks read low on CPU.

Claim checked: with GradCache, peak memory grows less than 1.3x from batch 8 to batch 512.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from common import machine, report  # noqa: E402

BATCHES = (8, 32, 128, 512)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def measure_one(mode: str, batch: int, args) -> dict:
    """Peak extra bytes and median seconds of one contrastive step in this process."""
    import torch

    from craft.gradcache import gradcache_backward, split_into_chunks
    from craft.hooks import LastHiddenStateCapture
    from craft.losses import InfoNCELoss, ProjectionHead, pool_hidden_states
    from craft.testing import tiny_model

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)  # one thread: many small chunk kernels are not starved by thread barriers
    model = tiny_model("llama", hidden_size=args.hidden, num_layers=args.layers).to(device).train()
    head = ProjectionHead(args.hidden, 128).to(device)
    infonce = InfoNCELoss(0.05, learnable_temperature=True).to(device)
    ids = torch.randint(4, 384, (2 * batch, args.seq_len), device=device)
    mask = torch.ones_like(ids)

    def encode(chunk):
        chunk_ids, chunk_mask = chunk
        with LastHiddenStateCapture(model) as capture:
            model(input_ids=chunk_ids, attention_mask=chunk_mask, use_cache=False, logits_to_keep=1)
        return pool_hidden_states(capture.hidden, chunk_mask, "last_token")

    def loss_fn(representations):
        emb = head(representations)
        return infonce(emb[:batch], emb[batch:])

    def step():
        if mode == "gradcache":
            chunks = [(ids[s], mask[s]) for s in split_into_chunks(2 * batch, args.chunk)]
            gradcache_backward(encode, chunks, loss_fn)
        else:
            loss_fn(encode((ids, mask))).backward()
        for module in (model, head, infonce):
            module.zero_grad(set_to_none=False)

    for module in (model, head, infonce):  # gradients exist before the measured step, as in training
        for param in module.parameters():
            param.grad = torch.zeros_like(param)
    # The first step of a fresh process is measured: nothing it allocates can come from memory an earlier step
    # left in the allocator's free lists.
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        before = _status_kib("VmRSS")
        _reset_peak_rss()
        step()
        peak = (_status_kib("VmHWM") - before) * 1024
    # CUDA: wall time. CPU: this process's CPU time, which other load on a shared machine does not inflate.
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    times = []
    for _ in range(args.repeats):
        start = clock()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(clock() - start)
    return {"peak_bytes": peak, "step_s": sorted(times)[len(times) // 2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--one", nargs=2, metavar=("MODE", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one[0], int(args.one[1]), args)))
        return
    print(f"machine: {machine()}")
    print(f"model: Llama hidden {args.hidden}, {args.layers} layers, {args.seq_len} tokens/sequence; "
          f"GradCache chunk {args.chunk} sequences")
    print(f"{'batch':>6} {'mode':>10} {'peak MiB':>10} {'step s':>8}")
    results = {}
    passthrough = ["--hidden", str(args.hidden), "--layers", str(args.layers), "--seq-len", str(args.seq_len),
                   "--chunk", str(args.chunk), "--repeats", str(args.repeats)]
    for batch in BATCHES:
        for mode in ("plain", "gradcache"):
            out = subprocess.run([sys.executable, __file__, "--one", mode, str(batch), *passthrough],
                                 capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            results[mode, batch] = result
            print(f"{batch:>6} {mode:>10} {result['peak_bytes'] / 2**20:>10.1f} {result['step_s']:>8.3f}", flush=True)
    first, last = BATCHES[0], BATCHES[-1]
    for mode in ("gradcache", "plain"):
        growth = results[mode, last]["peak_bytes"] / max(1, results[mode, first]["peak_bytes"])
        report(f"{mode}: peak memory, batch {last} / batch {first}", growth,
               goal="< 1.3" if mode == "gradcache" else "",
               detail=f"{results[mode, first]['peak_bytes'] / 2**20:.1f} -> "
                      f"{results[mode, last]['peak_bytes'] / 2**20:.1f} MiB")
    overhead = results["gradcache", last]["step_s"] / results["plain", last]["step_s"]
    report(f"step time at batch {last}, gradcache / plain", overhead,
           detail="GradCache runs the encoder twice (no-grad, then with grad)")


if __name__ == "__main__":
    main()
