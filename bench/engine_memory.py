"""Peak memory and step time of `craft train` at long sequences: checkpointing, offload, the chunked loss, and
HF Trainer + PEFT with gradient checkpointing, side by side in one run.

Command (from the repository root):

    HF_HUB_OFFLINE=1 .venv/bin/python bench/engine_memory.py [--lengths 512,1024,2048,4096,8192] [--cap-gib 11]

Model: a random Llama with hidden 256, 8 layers, a 128256-token vocabulary (Llama 3's), float32; LoRA rank 16 on
every linear map of the decoder layers, micro-batch 1, gradient accumulation 1, 3 optimizer steps on the same
packed rows (`craft.engine.data`). Configurations:

* naive      — `activation_checkpointing = false`, `chunk_size = 0`: every activation kept, all logits at once
               (the pipeline before checkpointing and the chunked loss existed, minus its extra copy of the logits
               in the pipeline's output buffer, so slightly kinder than the old code);
* ckpt       — checkpointing, all logits at once;
* ckpt+chunk — checkpointing and the chunked loss (`craft train`'s defaults);
* offload    — checkpointing with the layer inputs offloaded to CPU memory, chunked loss (on a CPU-only machine
               offload moves nothing off the device: it shows the cost of the copies);
* hf         — HF `Trainer` + PEFT LoRA with `activation_checkpointing=True` (it materialises float32 logits).

Each configuration at each length runs in a fresh subprocess, so peaks do not mix. Peak = the process's resident
high-water mark (`VmHWM`; on CUDA `torch.cuda.max_memory_allocated` instead); step time = median of steps 2-3.
A run whose predicted peak (`craft plan`'s tensor bytes + the measured resident size of a process that has
imported everything) exceeds `--cap-gib` is not run and is listed with its prediction, to keep a shared machine up.

The loss working set is measured apart, in its own subprocess: torch's allocator peak (profiler memory events) of
one forward + backward of the loss alone at 4096 tokens, chunked ÷ plain.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, report  # noqa: E402

HIDDEN, LAYERS, VOCAB, STEPS = 256, 8, 128256, 3
from engine_throughput import ALPHA, RANK  # noqa: E402  (the same LoRA as the throughput benchmark)
CONFIGS = {"naive": ("false", 0), "ckpt": ("true", 0), "ckpt+chunk": ("true", 256),
           "offload": ('"offload"', 256)}
GIB = 2 ** 30


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(field))


def _peak_bytes() -> int:
    import torch

    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else _status_bytes("VmHWM:")


def setup(root: Path) -> Path:
    from craft.testing import save_tiny_model, toy_texts

    save_tiny_model(root / "model", "llama", hidden_size=HIDDEN, num_layers=LAYERS, vocab_size=VOCAB,
                    intermediate_size=4 * HIDDEN, max_position_embeddings=8192)
    texts = toy_texts(8000, "pirate") + toy_texts(8000, "formal", seed=1)
    documents = [" ".join(texts[i:i + 20]) for i in range(0, len(texts), 20)]
    (root / "data.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in documents))
    dtype = "bfloat16" if _cuda() else "float32"
    (root / "config.toml").write_text(f"""
model_dir = "{root / 'model'}"
output_dir = "{root / 'out'}"
lora_rank = {RANK}
lora_alpha = {ALPHA}
lr = 1e-4
sequence_len = 512
model_dtype = "{dtype}"
eval_fraction = 0.0
evals_per_run = 0
max_steps = {STEPS}
[[datasets]]
dataset_path = "{root / 'data.jsonl'}"
""")
    return root / "config.toml"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ------------------------------------------------------------------------------------------------ children


def child_craft(config_path: str, length: int, name: str) -> dict:
    from craft.engine.config import load_config
    from craft.engine.train import train

    checkpointing, chunk = CONFIGS[name]
    config = load_config(config_path, [f"sequence_len={length}", f"activation_checkpointing={checkpointing}",
                                       f"chunk_size={chunk}", f'output_dir="{Path(config_path).parent}/{name}"'])
    summary = train(config, show_progress=False)
    records = [json.loads(line) for line in (Path(summary["run_dir"]) / "losses.jsonl").read_text().splitlines()]
    times = [length / r["train_tokens_per_second"] for r in records if "train_tokens_per_second" in r][1:]
    return {"peak": _peak_bytes(), "step_seconds": statistics.median(times)}


def child_hf(config_path: str, length: int) -> dict:
    from engine_throughput import hf_lora_step_times

    path = Path(config_path)
    sized = path.with_name(f"config_{length}.toml")
    sized.write_text(path.read_text().replace("sequence_len = 512", f"sequence_len = {length}"))
    times = hf_lora_step_times(sized, STEPS, 1, activation_checkpointing=True)
    return {"peak": _peak_bytes(), "step_seconds": statistics.median(times[1:])}


def child_loss(length: int) -> dict:
    """Allocator peak of the loss alone (forward + backward) at `length` tokens: plain and chunked."""
    import torch

    from craft.engine.loss import DEFAULT_CHUNK_SIZE, causal_lm_loss
    from craft_overhead import peak_allocated_bytes

    device = "cuda" if torch.cuda.is_available() else "cpu"
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False, device=device).requires_grad_(False)
    hidden = torch.randn(1, length, HIDDEN, device=device, requires_grad=True)
    labels = torch.randint(0, VOCAB, (1, length), device=device)
    out = {}
    for name, chunk in (("plain", 0), ("chunked", DEFAULT_CHUNK_SIZE)):
        def region():
            causal_lm_loss(hidden, labels, head, chunk).backward()
            hidden.grad = None

        if device == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            region()
            out[name] = torch.cuda.max_memory_allocated() - base
        else:
            out[name] = peak_allocated_bytes(region)
    return out


def child_baseline() -> dict:
    """Resident bytes of a process that has imported what a run imports (added to `craft plan`'s predictions)."""
    import deepspeed  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import craft.engine.train  # noqa: F401

    return {"rss": _status_bytes("VmRSS:")}


# ------------------------------------------------------------------------------------------------ parent


def run_child(*args: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def predicted_bytes(config_path: Path, length: int, name: str, baseline: int) -> float:
    """`craft plan`'s peak for the configuration (hf: checkpointing with all logits at once) + the baseline."""
    from craft.engine.config import load_config
    from craft.engine.model import read_hf_config
    from craft.engine.plan import plan

    checkpointing, chunk = CONFIGS.get(name, ("true", 0))
    config = load_config(config_path, [f"sequence_len={length}", f"activation_checkpointing={checkpointing}",
                                       f"chunk_size={chunk}"])
    return plan(config, read_hf_config(config.model_dir)).peak + baseline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,1024,2048,4096,8192")
    parser.add_argument("--cap-gib", type=float, default=11.0, help="skip runs predicted to need more")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, rest = args.child[0], args.child[1:]
        result = {"craft": lambda: child_craft(rest[0], int(rest[1]), rest[2]),
                  "hf": lambda: child_hf(rest[0], int(rest[1])), "loss": lambda: child_loss(int(rest[0])),
                  "baseline": child_baseline}[kind]()
        print(json.dumps(result))
        return

    lengths = [int(n) for n in args.lengths.split(",")]
    plan_lengths = {"naive": lengths, "ckpt": [1024, 4096], "ckpt+chunk": lengths, "offload": [1024, 4096],
                    "hf": lengths}
    print(machine(), f"| llama hidden {HIDDEN}, {LAYERS} layers, vocab {VOCAB}, LoRA r{RANK}, micro-batch 1")
    results: dict[str, dict[int, dict]] = {name: {} for name in plan_lengths}
    with tempfile.TemporaryDirectory() as tmp:
        config_path = setup(Path(tmp))
        baseline = run_child("baseline")["rss"] if not _cuda() else 0
        for length in lengths:
            for name, wanted in plan_lengths.items():
                if length not in wanted:
                    continue
                predicted = predicted_bytes(config_path, length, name, baseline)
                if predicted > args.cap_gib * GIB:
                    results[name][length] = {"skipped": predicted}
                    print(f"{name:>10} @ {length:5d}: not run: predicted {predicted / GIB:.1f} GiB", flush=True)
                    continue
                child = ("hf", str(config_path), str(length)) if name == "hf" else \
                    ("craft", str(config_path), str(length), name)
                result = run_child(*child)
                result["predicted"] = predicted
                results[name][length] = result
                print(f"{name:>10} @ {length:5d}: peak {result['peak'] / GIB:6.2f} GiB (plan + baseline "
                      f"{predicted / GIB:6.2f}), step {result['step_seconds']:6.2f} s", flush=True)
        loss = run_child("loss", "4096")
    summarize(results, loss)


def summarize(results: dict, loss: dict) -> None:
    def peak(name, length):
        return results[name].get(length, {}).get("peak")

    def seconds(name, length):
        return results[name].get(length, {}).get("step_seconds")

    logits_copy = (4096 - 1024) * VOCAB * 4
    growth = peak("ckpt+chunk", 4096) - peak("ckpt+chunk", 1024)
    report("craft train peak growth 1024 -> 4096 tokens / one float32 copy of the extra tokens' logits",
           growth / logits_copy, "<= 0.15", f"+{growth / 2**20:.0f} MiB vs {logits_copy / 2**20:.0f} MiB; "
           f"checkpointing + chunked loss, vocab {VOCAB}")
    if peak("naive", 4096) and peak("naive", 1024):
        naive_growth = peak("naive", 4096) - peak("naive", 1024)
        report("naive (no checkpointing, plain loss) peak growth 1024 -> 4096 / one float32 logits copy",
               naive_growth / logits_copy, "", f"+{naive_growth / GIB:.2f} GiB (the before-picture)")
    report("loss working set at 4096 tokens, vocab 128256: chunked / plain", loss["chunked"] / loss["plain"],
           "<= 0.125", f"{loss['chunked'] / 2**20:.0f} MiB vs {loss['plain'] / 2**20:.0f} MiB (allocator peak)")
    for length in (1024, 4096):
        if seconds("naive", length) and seconds("ckpt", length):
            report(f"step time with checkpointing / without ({length} tokens, plain loss)",
                   seconds("ckpt", length) / seconds("naive", length), "<= 1.4")
        if seconds("naive", length) and seconds("ckpt+chunk", length):
            report(f"step time checkpointing + chunked loss / neither ({length} tokens)",
                   seconds("ckpt+chunk", length) / seconds("naive", length), "<= 1.4")
        if seconds("ckpt+chunk", length) and seconds("offload", length):
            report(f"step time offload / checkpointing ({length} tokens, chunked loss)",
                   seconds("offload", length) / seconds("ckpt+chunk", length), "")
    for length in sorted(results["hf"]):
        if peak("hf", length) and peak("ckpt+chunk", length):
            report(f"craft train / HF Trainer + PEFT, both checkpointed: peak memory ({length} tokens)",
                   peak("ckpt+chunk", length) / peak("hf", length), "<= 1.0",
                   f"{peak('ckpt+chunk', length) / GIB:.2f} vs {peak('hf', length) / GIB:.2f} GiB")
            report(f"craft train / HF Trainer + PEFT, both checkpointed: tokens/s ({length} tokens)",
                   seconds("hf", length) / seconds("ckpt+chunk", length), ">= 1.0")
    for name, by_length in results.items():
        for length, result in sorted(by_length.items()):
            if "skipped" in result:
                print(f"{name} @ {length}: not run: predicted {result['skipped'] / GIB:.1f} GiB")
    ours = {length: r for length, r in results["ckpt+chunk"].items() if "peak" in r}
    if ours:
        worst = max(abs(r["predicted"] / r["peak"] - 1) for r in ours.values())
        report("craft plan prediction (+ process baseline) vs measured peak, checkpointing + chunked loss: "
               "largest relative error", worst, "<= 0.25", ", ".join(f"{n}: {r['predicted'] / GIB:.2f} vs "
                                                                   f"{r['peak'] / GIB:.2f} GiB"
                                                                   for n, r in sorted(ours.items())))


if __name__ == "__main__":
    main()
