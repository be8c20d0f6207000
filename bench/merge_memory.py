"""Peak memory of `craft merge` (shard by shard, streamed) vs the naive merge, measured side by side in one run.

Command (from the repository root):

    HF_HUB_OFFLINE=1 .venv/bin/python bench/merge_memory.py [--hidden 512] [--layers 8] [--vocab 8192] [--shard 40MB]

It writes a Llama-architecture model (float32, sharded to `--shard`) and a rank-16 PEFT LoRA on all seven
projections to a temporary directory, then runs each merge in a fresh subprocess that first imports the same
modules (torch, transformers, peft, craft.export), resets the kernel's resident-set high-water mark
(`/proc/self/clear_refs` = 5), and reports `VmHWM − VmRSS` at the reset: the memory the merge itself added.

* craft:  `craft.export.merge.merge(base, lora, out)`;
* naive:  `AutoModelForCausalLM.from_pretrained` + `PeftModel.from_pretrained` + `merge_and_unload` +
          `save_pretrained(max_shard_size=...)`.

It prints both peaks, each as a multiple of the largest shard file, and their ratio, and checks that both outputs
hold the same tensors (max abs difference).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report  # noqa: E402

_CHILD = r"""
import json, sys, time
import torch, transformers, peft, safetensors  # same imports for both variants
import craft.export.merge

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")
start = rss("VmRSS:")
mode, base, lora, out, shard = sys.argv[1:6]
began = time.perf_counter()
if mode == "craft":
    craft.export.merge.merge(base, lora, out)
else:
    from transformers import AutoModelForCausalLM
    from peft import PeftModel
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, lora).merge_and_unload()
    model.save_pretrained(out, max_shard_size=shard)
print(json.dumps({"peak": rss("VmHWM:") - start, "seconds": time.perf_counter() - began}))
"""


def _build(root: Path, args) -> tuple[Path, Path]:
    import torch
    from peft import LoraConfig, get_peft_model

    from craft.testing import save_tiny_model, tiny_model

    base = save_tiny_model(root / "base", "llama", max_shard_size=args.shard, vocab_size=args.vocab,
                           hidden_size=args.hidden, num_layers=args.layers)
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama", vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers),
                           LoraConfig(r=16, lora_alpha=32, init_lora_weights=False,
                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                      "down_proj"]))
    model.save_pretrained(root / "lora")
    return base, root / "lora"


def _run(mode: str, base: Path, lora: Path, out: Path, shard: str) -> dict:
    result = subprocess.run([sys.executable, "-c", _CHILD, mode, str(base), str(lora), str(out), shard],
                            check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _max_difference(left: Path, right: Path) -> float:
    """Largest absolute difference between same-named tensors of two model directories (any sharding)."""
    from safetensors import safe_open

    def locations(directory):
        found = {}
        for shard in sorted(directory.glob("*.safetensors")):
            with safe_open(shard, "pt") as handle:
                found.update({key: shard for key in handle.keys()})
        return found

    left_map, right_map = locations(left), locations(right)
    assert left_map.keys() == right_map.keys(), "the two merges hold different tensors"
    worst = 0.0
    for key, shard in left_map.items():
        with safe_open(shard, "pt") as a, safe_open(right_map[key], "pt") as b:
            worst = max(worst, float((a.get_tensor(key).float() - b.get_tensor(key).float()).abs().max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--shard", default="40MB")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, lora = _build(root, args)
        shards = sorted(base.glob("*.safetensors"))
        largest = max(shard.stat().st_size for shard in shards)
        total = sum(shard.stat().st_size for shard in shards)
        results = {mode: _run(mode, base, lora, root / mode, args.shard) for mode in ("craft", "naive")}
        difference = _max_difference(root / "craft", root / "naive")
    mib = 2 ** 20
    print(f"model: {total / mib:.1f} MiB in {len(shards)} shards, largest shard {largest / mib:.1f} MiB")
    for mode, result in results.items():
        print(f"{mode:>5}: peak +{result['peak'] / mib:7.1f} MiB = {result['peak'] / largest:5.2f} x largest shard "
              f"({result['seconds']:.1f} s)")
    print(f"naive / craft peak ratio: {results['naive']['peak'] / results['craft']['peak']:.2f}")
    report("craft merge peak memory / largest shard", results["craft"]["peak"] / largest, "< 2",
           f"{len(shards)} shards, largest {largest / mib:.1f} MiB")
    report("craft merge peak memory / naive load + merge_and_unload + save", results["craft"]["peak"] /
           results["naive"]["peak"], "< 1", f"model {total / mib:.1f} MiB")
    print(f"max |craft - naive| over all tensors: {difference:.3g}")


if __name__ == "__main__":
    main()
