#!/usr/bin/env bash
# Run every benchmark on a CUDA machine and record the numbers.
#
#   bash bench/gpu.sh                 # from anywhere; works in the repository root
#
# 1. `make install` with a CUDA build of torch: TORCH_SPEC (default torch==2.13.0) from the PyTorch wheel index in
#    PIP_EXTRA_INDEX_URL (default CUDA 12.8). A .venv that already holds a CPU-only torch is reported, not reused.
# 2. `bench/run_all.py`: every bench/*.py, each on CUDA in bf16 where it has a GPU path, BENCHMARKS.md regenerated.
#    bench/craft_vs_original.py builds .venv-baseline with the same TORCH_SPEC / index (both are exported).
# 3. `bench/mfu.py` is one of those benchmarks: MFU and peak memory of LoRA and Control Adapter training of a
#    ~1B-parameter random-init Llama (hidden 2048, 16 layers, sequence 2048) with `craft train`. Its lines are
#    repeated at the end. The full log is written to runs/bench-gpu.log.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L; then
    echo "bench/gpu.sh: no NVIDIA GPU visible (nvidia-smi); use 'make bench' on CPU" >&2
    exit 1
fi

export TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
export PIP_EXTRA_INDEX_URL="${PIP_EXTRA_INDEX_URL:-https://download.pytorch.org/whl/cu128}"
make install TORCH_SPEC="$TORCH_SPEC"

if ! .venv/bin/python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "bench/gpu.sh: .venv's torch ($(.venv/bin/python -c 'import torch; print(torch.__version__)')) cannot" \
         "use the GPU; run 'make clean' and this script again to install a CUDA build" >&2
    exit 1
fi

export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p runs
status=0
.venv/bin/python bench/run_all.py 2>&1 | tee runs/bench-gpu.log || status=$?
echo
echo "== MFU (bench/mfu.py)"
grep -E '^(model: random-init Llama, |peak: |FLOPs/token|LoRA |Control Adapter )' runs/bench-gpu.log || true
exit "$status"
