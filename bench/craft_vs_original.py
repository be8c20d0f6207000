"""CRAFT objective: craft-tune vs the PyPI package `contrastive-ft==0.4.3`, side by side in one run.

Both packages are imported as `craft`, so they never share a process. The original lives in its own virtual
environment, `.venv-baseline/` in the repository root, created by this script on first use (`python -m venv`,
then torch — `$TORCH_SPEC` if set, else the main venv's torch version — then `contrastive-ft[all]==0.4.3` with
the main venv's transformers / trl / peft / accelerate / datasets versions). `bench/craft_worker.py` runs once per
implementation, each with its own venv's python:

* step time and peak memory of the CRAFT objective (paired InfoNCE + SFT, alpha 0.6, half the micro-batches of
  each accumulation window contrastive) with each package's `CRAFTTrainerMixin` on a plain `transformers.Trainer`
  — the same host loop, model (random-init Llama built from a config, seed 0) and data (seeded random token ids).
  What is driven of the original: its `CRAFTTrainerMixin`, `CRAFTMixedDataLoader`, `CRAFTCollator`, accumulator,
  `InfoNCELoss` / `ProjectionHead` and hook fallback, exactly as its trainer calls them. Not its
  `CRAFTSFTConfig`, which cannot be built on TRL 1.x (see the feature matrix); its config mixin is combined with
  `TrainingArguments` instead. The contrastive rows carry all -100 `labels` for both, because transformers 5's
  Trainer raises KeyError on a micro-batch without `labels` (the original's documented contrastive batches);
- a feature matrix: each README feature of the original, run for real in its venv on a tiny model: ✓ or ✗ with
  the exception or the measured reason.

Ratios are ours ÷ original (lower is better). Times are medians over the timed steps; the workers run one after
the other, alternating ours, original, original, ours (`--rounds 2`, the default) against load drift. On CPU the
workers use one torch thread and the step-time ratio is of CPU time per step (wall time is printed too): on a
machine shared with other jobs wall time swings several-fold with their load, CPU time hardly. On CUDA it is wall
time.

Run (CPU; the first run also creates .venv-baseline, a few minutes):
    .venv/bin/python bench/craft_vs_original.py
    .venv/bin/python bench/craft_vs_original.py --hidden 1024 --layers 8 --seq 512 --batch 8   # GPU
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
from common import machine, report  # noqa: E402

BASELINE_VENV = ROOT / ".venv-baseline"
BASELINE_PACKAGE = "contrastive-ft[all]==0.4.3"
MIRRORED = ("transformers", "trl", "peft", "accelerate", "datasets")
WORKER = BENCH / "craft_worker.py"


def baseline_python() -> Path:
    return BASELINE_VENV / "bin" / "python"


def baseline_requirements() -> list[str]:
    """The original package pinned next to the main venv's versions of the libraries both depend on."""
    return [BASELINE_PACKAGE] + [f"{name}=={importlib.metadata.version(name)}" for name in MIRRORED]


def torch_requirement() -> str:
    """`$TORCH_SPEC` (as `make install` uses it), else the main venv's torch version without its local label."""
    return os.environ.get("TORCH_SPEC") or f"torch=={importlib.metadata.version('torch').split('+')[0]}"


def ensure_baseline_venv() -> None:
    """Create `.venv-baseline` with contrastive-ft 0.4.3 unless a complete one (marker file) is there."""
    marker = BASELINE_VENV / ".installed"
    wanted = "\n".join([torch_requirement(), *baseline_requirements()])
    if marker.is_file() and marker.read_text() == wanted and baseline_python().is_file():
        return
    print(f"creating {BASELINE_VENV.name}/ with {BASELINE_PACKAGE} (first run only)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(BASELINE_VENV)], check=True)
    (BASELINE_VENV / ".gitignore").write_text("*\n")  # never committed, whatever the repository ignores
    pip = [str(baseline_python()), "-m", "pip", "install", "--quiet"]
    subprocess.run(pip + [torch_requirement()], check=True)  # torch alone first: the rest keeps this build
    subprocess.run(pip + baseline_requirements(), check=True)
    marker.write_text(wanted)


def run_worker(python: Path, *arguments: str) -> dict:
    """Run the worker and return its `WORKER {json}` result; its stderr is shown when it fails."""
    command = [str(python), str(WORKER), *arguments]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("WORKER ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-6000:])
        raise SystemExit(f"worker failed (exit {proc.returncode}): {' '.join(command)}")
    return json.loads(lines[-1][len("WORKER "):])


def feature_matrix(probes: list[dict]) -> str:
    """The probe results as a markdown table."""
    rows = ["| contrastive-ft 0.4.3 feature (TRL " + importlib.metadata.version("trl") + ") | runs | what happened |",
            "|---|---|---|"]
    for probe in probes:
        note = probe["note"].replace("|", "/")
        rows.append(f"| {probe['feature']} | {'✓' if probe['ok'] else '✗'} | {note} |")
    return "\n".join(rows)


def timing_order(rounds: int) -> list[str]:
    """ours, original, then mirrored (original, ours), ... so slow drift of the machine's load cancels."""
    order = []
    for index in range(rounds):
        order += ["ours", "original"] if index % 2 == 0 else ["original", "ours"]
    return order


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2, help="worker runs per implementation (alternating)")
    parser.add_argument("--no-probes", action="store_true", help="skip the feature matrix")
    options = parser.parse_args()

    ensure_baseline_venv()
    pythons = {"ours": Path(sys.executable), "original": baseline_python()}
    shape = ["--hidden", str(options.hidden), "--layers", str(options.layers), "--seq", str(options.seq),
             "--batch", str(options.batch), "--accumulation", str(options.accumulation),
             "--warmup", str(options.warmup), "--steps", str(options.steps)]
    print(f"machine: {machine()}")
    print(f"model: random-init Llama hidden={options.hidden} layers={options.layers}; batch {options.batch} x "
          f"seq {options.seq}, {options.accumulation} micro-batches per step (half SFT, half paired InfoNCE)")
    runs: dict[str, list[dict]] = {"ours": [], "original": []}
    for impl in timing_order(options.rounds):
        result = run_worker(pythons[impl], "time", "--impl", impl, *shape)
        runs[impl].append(result)
        growth = result.get("memory_growth_mb")
        print(f"  {impl:8s} median step {result['step_seconds'] * 1e3:9.1f} ms wall, "
              f"{result['step_cpu_seconds'] * 1e3:9.1f} ms CPU; peak memory {result['peak_memory_mb']:7.1f} MiB"
              + (f" (growth during train() {growth:.1f} MiB)" if growth is not None else ""), flush=True)
        for name, key in (("wall", "all_step_seconds"), ("CPU", "all_step_cpu_seconds")):
            print(f"           steps, {name} ms: " + " ".join(f"{t * 1e3:.0f}" for t in result[key]), flush=True)

    def pooled(impl: str, key: str) -> float:
        """Median over every timed step of every run (step lists), or over the runs (numbers)."""
        values = [v for run in runs[impl] for v in (run[key] if isinstance(run[key], list) else [run[key]])]
        return statistics.median(values)

    device = runs["ours"][0]["device"]
    # On a CPU shared with other jobs wall time per step swings several-fold with their load; the process's CPU
    # time (one torch thread) is the work done. On CUDA the wall time (synchronised) is the step time.
    time_key, time_name = ("all_step_seconds", "wall") if device == "cuda" else ("all_step_cpu_seconds",
                                                                                 "CPU time, 1 thread")
    ours_step, original_step = pooled("ours", time_key), pooled("original", time_key)
    ours_wall, original_wall = pooled("ours", "all_step_seconds"), pooled("original", "all_step_seconds")
    memory_key = "peak_memory_mb" if device == "cuda" else "memory_growth_mb"
    memory_name = "peak allocated CUDA memory" if device == "cuda" else "RSS growth during train()"
    ours_memory, original_memory = pooled("ours", memory_key), pooled("original", memory_key)
    print(f"step time ({time_name})   ours {ours_step * 1e3:.1f} ms / original {original_step * 1e3:.1f} ms = "
          f"{ours_step / original_step:.3f}   (wall: {ours_wall * 1e3:.1f} / {original_wall * 1e3:.1f} ms = "
          f"{ours_wall / original_wall:.3f})")
    print(f"{memory_name}   ours {ours_memory:.1f} MiB / original {original_memory:.1f} MiB = "
          f"{ours_memory / original_memory:.3f}")
    setting = (f"Llama h{options.hidden} L{options.layers}, batch {options.batch}x{options.seq}, GA "
               f"{options.accumulation}, {device}")
    report(f"CRAFT step time ({time_name}; paired InfoNCE + SFT) vs contrastive-ft 0.4.3",
           ours_step / original_step, "<= 1.1",
           f"{ours_step * 1e3:.0f} ms vs {original_step * 1e3:.0f} ms (wall {ours_wall / original_wall:.2f}x); "
           f"{setting}")
    report(f"CRAFT {memory_name} vs contrastive-ft 0.4.3", ours_memory / original_memory, "<= 1.1",
           f"{ours_memory:.0f} MiB vs {original_memory:.0f} MiB; {setting}")

    if not options.no_probes:
        probes = run_worker(pythons["original"], "probe", "--impl", "original")["probes"]
        print("\n" + feature_matrix(probes) + "\n")
        passed = sum(probe["ok"] for probe in probes)
        report("contrastive-ft 0.4.3 README features that run on current TRL (fraction)", passed / len(probes), "",
               f"{passed} of {len(probes)}; matrix in docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
