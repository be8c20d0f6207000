"""Training-step time of a Control Adapter relative to a PEFT LoRA of the same rank on the same layers.

Both adapters train on the same frozen base model (a llama-architecture model built from a config, random
weights). The LoRA targets the two projections that write to the residual stream, `o_proj` and `down_proj` — the
modules a sublayer Control Adapter is equivalent to a LoRA on — with the same rank and alpha. One step = forward,
backward, Adam step. Steps of the variants are interleaved (round robin) so machine-load drift hits all of them
alike; the reported numbers are the median wall time and the median process CPU time of a step (the CPU time is
less disturbed by other processes competing for the cores of a shared machine). Control Adapter variants: all tokens class +1; a batch whose
rows alternate +1 / -1 (exact Woodbury inverse); per-token mixed classes -1/0/+1.

Run (CPU, a few minutes at the defaults):
    .venv/bin/python bench/control_adapter_overhead.py
    .venv/bin/python bench/control_adapter_overhead.py --hidden 256 --seq 128 --steps 20 --threads 1
    .venv/bin/python bench/control_adapter_overhead.py --hidden 1024 --layers 4 --seq 512 --batch 4 --device cuda
Prints one line per variant and the ratios CA / LoRA (goal: <= 1.1).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
import statistics
import time

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report  # noqa: E402


def build_base(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                         num_key_value_heads=max(1, args.hidden // 64), max_position_embeddings=args.seq)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(args.device, getattr(torch, args.dtype))


def control_adapter_model(args):
    from craft.adapters import ControlAdapterConfig, add_control_adapters

    return add_control_adapters(build_base(args), ControlAdapterConfig(rank=args.rank))


def lora_model(args):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_base(args), LoraConfig(r=args.rank, lora_alpha=args.rank ** 0.5,
                                                        target_modules=["o_proj", "down_proj"]))
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # fp32 adapters, as the Control Adapter's
    return model


def make_step(model, batch, classes):
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():  # non-zero B so no path is skipped as identity
        for p in params:
            p.add_(0.01 * torch.randn_like(p))
    optimizer = torch.optim.Adam(params, lr=1e-4)
    extra = {} if classes is None else {"control_classes": classes}

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = model(batch, labels=batch, **extra).loss
        loss.backward()
        optimizer.step()
        return loss

    return step


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="base model dtype (adapters are float32 either way)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)
    rows = torch.tensor([1, -1] * args.batch, device=args.device)[: args.batch, None].expand(-1, args.seq)
    per_token = torch.randint(-1, 2, (args.batch, args.seq), device=args.device)
    variants = {
        "lora(o_proj,down_proj)": make_step(lora_model(args), batch, None),
        "control_adapter(+1)": make_step(control_adapter_model(args), batch, None),
        "control_adapter(rows +1/-1)": make_step(control_adapter_model(args), batch, rows.contiguous()),
        "control_adapter(tokens -1/0/+1)": make_step(control_adapter_model(args), batch, per_token),
    }
    wall = {name: [] for name in variants}
    cpu = {name: [] for name in variants}
    for index in range(args.warmup + args.steps):
        for name, step in variants.items():
            synchronize(args.device)
            start, start_cpu = time.perf_counter(), time.process_time()
            step()
            synchronize(args.device)
            if index >= args.warmup:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    print(f"device={args.device} dtype={args.dtype} hidden={args.hidden} layers={args.layers} seq={args.seq} "
          f"batch={args.batch} rank={args.rank} steps={args.steps} threads={torch.get_num_threads()}")
    lora_wall, lora_cpu = (statistics.median(t["lora(o_proj,down_proj)"]) for t in (wall, cpu))
    for name in variants:
        step_wall, step_cpu = statistics.median(wall[name]), statistics.median(cpu[name])
        print(f"{name:32s} wall {step_wall * 1e3:9.2f} ms (ratio to LoRA {step_wall / lora_wall:.3f})   "
              f"cpu {step_cpu * 1e3:9.2f} ms (ratio to LoRA {step_cpu / lora_cpu:.3f})")
        if name != "lora(o_proj,down_proj)":
            report(f"Control Adapter {name.removeprefix('control_adapter')} step time / PEFT LoRA (o_proj+down_proj, "
                   f"rank {args.rank}), CPU time", step_cpu / lora_cpu, "<= 1.1",
                   f"hidden {args.hidden}, {args.layers} layers, seq {args.seq}, wall ratio {step_wall / lora_wall:.3f}")


if __name__ == "__main__":
    main()
