"""Model FLOPs utilisation (MFU) and peak memory of LoRA and Control Adapter training with `craft train`.

For each mode a random-init Llama is written to a scratch directory (config-built, seed 0) with a generated
random-text dataset (seeded pseudo-words, `.jsonl`) and a generated TOML config; then the engine trains it —
`craft.engine.train.train`, exactly what `craft train CONFIG.toml` runs, in a child process per mode so peak
memory is per mode. Tokens/s is the median of the engine's own per-step `train/tokens_per_second`
(`losses.jsonl`) after the warm-up steps (the engine reads the loss back after each step, which synchronises CUDA).

    MFU = tokens/s × FLOPs per token ÷ peak FLOP/s of the device

    FLOPs per token (LoRA / Control Adapter) = 4·N_frozen + 6·N_trainable + 12·L·H·T
        N_frozen    = weights of the matrix multiplies of the frozen base: every nn.Linear of the decoder layers
                      and the LM head (the input embedding is a lookup and norms are element-wise: not counted)
        4·N_frozen  = forward (2 FLOPs per weight per token) + activation gradients (2); no weight gradients
        6·N_trainable = forward + activation gradients + weight gradients of the adapter factors (read from the
                      adapter the run saved)
        12·L·H·T    = attention scores and weighted values (forward 4·H·T per layer, backward twice that),
                      L layers, hidden H, sequence length T, the causal mask not discounted (PaLM's convention)
    (full fine-tuning would be 6·N + 12·L·H·T.)

Peak FLOP/s: bf16 dense tensor-core peak from a table for known GPUs (H100 SXM / H200 989 TFLOP/s, H100 NVL 835,
H100 PCIe 756, A100 312, L40S 362, L4 121, A10 125); for other GPUs and on CPU the measured peak of a square matmul
in the training dtype (the best of several runs before and after the training runs). Peak memory:
`torch.cuda.max_memory_allocated` on CUDA; on CPU the process's resident-set high-water mark (VmHWM), which
includes the libraries.

Sizes: on CUDA (bf16) a ~1B-parameter Llama — hidden 2048, 16 layers, 16 heads, SwiGLU 5632, vocab 32000 —
sequence 2048, micro-batch 4; on CPU (float32) hidden 256, 4 layers, vocab 1024, sequence 256, micro-batch 2.

Run:
    .venv/bin/python bench/mfu.py                       # CUDA if present, else the small CPU model
    .venv/bin/python bench/mfu.py --modes lora --steps 20 --micro-batch 8
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
from common import machine, report  # noqa: E402

# bf16 dense (no sparsity) tensor-core peaks in TFLOP/s, by a substring of torch.cuda.get_device_name().
# Checked in order, the first match wins: "H100 PCIe" and "H100 NVL" before "H100", "L40S" before "L4".
GPU_BF16_PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
                        ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0))

SIZES = {  # model and run shape per device kind
    "cuda": dict(hidden=2048, layers=16, heads=16, intermediate=5632, vocab=32000, seq=2048, micro_batch=4),
    "cpu": dict(hidden=256, layers=4, heads=4, intermediate=688, vocab=1024, seq=256, micro_batch=2),
}


# ------------------------------------------------------------------------------------------- the device


def device_kind() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def training_dtype(kind: str) -> torch.dtype:
    return torch.bfloat16 if kind == "cuda" else torch.float32


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measured_matmul_peak(kind: str, dtype: torch.dtype, size: int | None = None, repeats: int = 5) -> float:
    """Best FLOP/s of `C = A @ B` (square, `size`, 2·size³ FLOPs) over `repeats` timed runs of a few matmuls."""
    size = size or (8192 if kind == "cuda" else 2048)
    a = torch.randn(size, size, device=kind, dtype=dtype)
    b = torch.randn(size, size, device=kind, dtype=dtype)
    per_run = 10 if kind == "cuda" else 3
    a @ b  # warm-up: kernels chosen, memory touched
    best = float("inf")
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        for _ in range(per_run):
            a @ b
        synchronize()
        best = min(best, (time.perf_counter() - start) / per_run)
    return 2 * size**3 / best


def datasheet_peak_tflops(device_name: str) -> float | None:
    """The bf16 dense peak (TFLOP/s) of a GPU named like `torch.cuda.get_device_name()`, None if not tabled."""
    return next((tflops for key, tflops in GPU_BF16_PEAK_TFLOPS if key in device_name), None)


def device_peak(kind: str, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s, where the number comes from)."""
    if kind == "cuda":
        name = torch.cuda.get_device_name(0)
        tflops = datasheet_peak_tflops(name)
        if tflops is not None:
            return tflops * 1e12, f"{name}: {tflops:g} TFLOP/s bf16 dense (datasheet)"
        peak = measured_matmul_peak(kind, dtype)
        return peak, f"{name}: not in the table, measured matmul peak {peak / 1e12:.1f} TFLOP/s"
    peak = measured_matmul_peak(kind, dtype)
    return peak, f"CPU: measured {str(dtype).removeprefix('torch.')} matmul peak {peak / 1e9:.1f} GFLOP/s"


# ---------------------------------------------------------------------------------------- FLOPs per token


def frozen_matmul_weights(model) -> int:
    """N_frozen: elements of every nn.Linear weight (decoder layers and LM head); embeddings and norms excluded."""
    return sum(module.weight.numel() for module in model.modules() if isinstance(module, torch.nn.Linear))


def flops_per_token(frozen: int, trainable: int, layers: int, hidden: int, seq: int) -> int:
    """4·N_frozen + 6·N_trainable + 12·L·H·T (see the module docstring)."""
    return 4 * frozen + 6 * trainable + 12 * layers * hidden * seq


# --------------------------------------------------------------------------------- model, data and config


def llama_config(size: dict):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=size["vocab"], hidden_size=size["hidden"], intermediate_size=size["intermediate"],
                       num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
                       num_key_value_heads=size["heads"], max_position_embeddings=size["seq"], bos_token_id=1,
                       eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)


def write_base_model(path: Path, size: dict, dtype: torch.dtype) -> None:
    """A random-init Llama (seed 0) and the test tokenizer (ids below 384; the model's vocab may be larger)."""
    from transformers import AutoModelForCausalLM

    from craft.testing import make_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(llama_config(size), dtype=dtype)
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)


def write_random_text(path: Path, tokens_needed: int, seed: int = 0) -> None:
    """Pseudo-words of 2-9 random lowercase letters in 200-word documents, about 2·tokens_needed characters
    (the byte-level test tokenizer gives fewer tokens than characters), one JSON `text` per line."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    written = 0
    with open(path, "w", encoding="utf-8") as out:
        while written < 2 * tokens_needed:
            text = " ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(200))
            out.write(json.dumps({"text": text}) + "\n")
            written += len(text)


def write_config(path: Path, mode: str, model_dir: Path, data: Path, output_dir: Path, size: dict, kind: str,
                 steps: int, rank: int) -> None:
    """The TOML `craft train` reads: LoRA on every linear map of the decoder, or Control Adapters on every layer."""
    adapter = "use_control_adapters = true" if mode == "control" else "use_control_adapters = false"
    path.write_text("\n".join([
        f'model_dir = "{model_dir}"', f'output_dir = "{output_dir}"', adapter, f"lora_rank = {rank}",
        "lr = 1e-4", f"sequence_len = {size['seq']}", f"micro_batch_size = {size['micro_batch']}",
        "gradient_accumulation_steps = 1", f'model_dtype = "{"bfloat16" if kind == "cuda" else "float32"}"',
        f"max_steps = {steps}", "eval_fraction = 0.0", "evals_per_run = 0", "checkpoint_interval_hours = 100.0",
        "", "[[datasets]]", f'dataset_path = "{data}"', "",
    ]))


# ------------------------------------------------------------------------------------- one mode (child)


def saved_tensor_elements(directory: Path) -> int:
    """Elements of every tensor in the `*.safetensors` files of `directory` (the saved adapter)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as tensors:
            for name in tensors.keys():
                total += math.prod(tensors.get_slice(name).get_shape())
    return total


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024


def run_child(config_path: str, warmup: int) -> dict:
    """Train with the engine; tokens/s per step from losses.jsonl, trainable count from the saved adapter."""
    from craft.engine.config import load_config
    from craft.engine.train import train

    summary = train(load_config(config_path), show_progress=False)
    records = [json.loads(line) for line in open(Path(summary["run_dir"]) / "losses.jsonl", encoding="utf-8")]
    rates = [r["train_tokens_per_second"] for r in records if "train_tokens_per_second" in r][warmup:]
    if not rates:
        raise SystemExit(f"{summary['steps']} steps trained, none after the {warmup} warm-up steps to time")
    return {"tokens_per_second": statistics.median(rates), "steps_timed": len(rates),
            "trainable": saved_tensor_elements(Path(summary["output"])), "peak_memory_mb": peak_memory_mb(),
            "mode": summary["mode"]}


def run_mode(mode: str, work: Path, size: dict, kind: str, steps: int, warmup: int, rank: int) -> dict:
    config = work / f"{mode}.toml"
    write_config(config, mode, work / "base", work / "data.jsonl", work / f"out_{mode}", size, kind, steps, rank)
    proc = subprocess.run([sys.executable, __file__, "--child", str(config), "--warmup", str(warmup)], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("MFU_CHILD ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"craft train ({mode}) failed with exit code {proc.returncode}")
    return json.loads(lines[-1][len("MFU_CHILD "):])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="lora,control", help="comma-separated: lora, control")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per mode (default 12 CUDA, 6 CPU)")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the device's peak")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        print("MFU_CHILD " + json.dumps(run_child(options.child, options.warmup)), flush=True)
        return 0

    kind = device_kind()
    dtype = training_dtype(kind)
    size = dict(SIZES[kind])
    size["micro_batch"] = options.micro_batch or size["micro_batch"]
    size["seq"] = options.seq or size["seq"]
    steps = options.steps or (12 if kind == "cuda" else 6)
    if options.peak_tflops:
        peak, peak_source = options.peak_tflops * 1e12, f"given: {options.peak_tflops:g} TFLOP/s"
    else:
        peak, peak_source = device_peak(kind, dtype)
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        meta_model = AutoModelForCausalLM.from_config(llama_config(size))
    frozen = frozen_matmul_weights(meta_model)
    total = sum(p.numel() for p in meta_model.parameters())
    print(f"machine: {machine()}")
    print(f"model: random-init Llama, {total / 1e6:.1f} M parameters (N_frozen = {frozen / 1e6:.1f} M in matmuls), "
          f"hidden {size['hidden']}, {size['layers']} layers, vocab {size['vocab']}; sequence {size['seq']}, "
          f"micro-batch {size['micro_batch']}, {str(dtype).removeprefix('torch.')}, {steps} steps "
          f"({options.warmup} warm-up)")
    print("FLOPs/token = 4·N_frozen + 6·N_trainable + 12·L·H·T; MFU = tokens/s × FLOPs/token ÷ peak; "
          "trained by craft train (craft.engine.train.train)")
    results = {}
    with tempfile.TemporaryDirectory(prefix="craft-mfu-") as scratch:
        work = Path(scratch)
        write_base_model(work / "base", size, dtype)
        write_random_text(work / "data.jsonl", steps * size["micro_batch"] * size["seq"] + 4 * size["seq"])
        for mode in [m.strip() for m in options.modes.split(",") if m.strip()]:
            if mode not in ("lora", "control"):
                raise SystemExit(f"--modes: unknown mode {mode!r} (lora, control)")
            results[mode] = run_mode(mode, work, size, kind, steps, options.warmup, options.rank)
    if "measured" in peak_source:
        # Measured again after the runs, the best of both counts: on a machine shared with other jobs a peak
        # taken during a busy moment would make the training look faster than the hardware.
        again, again_source = device_peak(kind, dtype)
        if again > peak:
            peak, peak_source = again, again_source
        peak_source += " (best of before and after the runs)"
    print(f"peak: {peak_source}")
    for mode, result in results.items():
        per_token = flops_per_token(frozen, result["trainable"], size["layers"], size["hidden"], size["seq"])
        mfu = result["tokens_per_second"] * per_token / peak
        name = "LoRA" if mode == "lora" else "Control Adapter"
        print(f"{name:16s} {result['tokens_per_second']:10.1f} tokens/s  N_trainable "
              f"{result['trainable'] / 1e6:.3f} M  {per_token / 1e9:.3f} GFLOPs/token  MFU {100 * mfu:5.1f} %  "
              f"peak memory {result['peak_memory_mb']:.0f} MiB", flush=True)
        report(f"MFU, {name} training (rank {options.rank}) with craft train", mfu, "",
               f"{result['tokens_per_second']:.0f} tokens/s x {per_token / 1e9:.3f} GFLOP/token / "
               f"{peak / 1e12:.3g} TFLOP/s peak; peak memory {result['peak_memory_mb']:.0f} MiB; "
               f"{total / 1e6:.0f} M-param Llama, seq {size['seq']}, micro-batch {size['micro_batch']}, "
               f"{str(dtype).removeprefix('torch.')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
