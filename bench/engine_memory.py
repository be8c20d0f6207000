"""Peak memory and step time of `craft train` at long sequences: checkpointing, offload, the chunked loss, and
HF Trainer + PEFT with gradient checkpointing, side by side in one run.

Command (from the repository root):

    HF_HUB_OFFLINE=1 .venv/bin/python bench/engine_memory.py [--lengths 1024,4096,8192] [--cap-gib 11]

Model: a random Llama with hidden 256, 8 layers, a 128256-token vocabulary (Llama 3's), float32; LoRA rank 16 on
every linear map of the decoder layers, micro-batch 1, gradient accumulation 1, on the same packed rows
(`craft.engine.data`). At `--time-length` (1024) every configuration runs 2 optimizer steps and the second is
timed; at the other lengths one step, for its peak. Configurations:

* naive      — `activation_checkpointing = false`, `chunk_size = 0`: every activation kept, all logits at once
               (the pipeline before checkpointing and the chunked loss existed, minus its extra copy of the logits
               in the pipeline's output buffer, so slightly kinder than the old code);
* ckpt       — checkpointing, all logits at once;
* ckpt+chunk — checkpointing and the chunked loss (`craft train`'s defaults);
* offload    — checkpointing with the layer inputs offloaded to CPU memory, chunked loss (on a CPU-only machine
               offload moves nothing off the device: it shows the cost of the copies);
* hf         — HF `Trainer` + PEFT LoRA with `activation_checkpointing=True` (it materialises float32 logits).

Each configuration at each length runs in a fresh subprocess, so peaks do not mix, with the environment its
users get (`craft train`'s children: THP_MEM_ALLOC_ENABLE=1 as the `craft train` command sets it, and `train()`'s
own allocator settings, `craft.engine.allocator`; HF's: none). Two peaks per run:
* "peak" — on CPU the process's resident high-water mark (`VmHWM`), what the machine must have; on CUDA
  `torch.cuda.max_memory_allocated`, what matters there (the allocator's reserve comes on top);
* "tensor peak" — the bytes of the model's parameters and buffers + torch's allocator peak during the first
  optimizer step (`FirstCallPeak`; on CPU every allocation and free the profiler records, `allocated_peak_bytes`),
  what `craft plan` predicts.
A run whose predicted peak (`craft plan`'s tensor bytes + the measured resident size of a process that has
imported everything), times RSS_MARGIN (1.25), exceeds `--cap-gib` (11 on CPU) is not run and is listed with its
prediction, to keep a shared machine up.

Step times come from one more subprocess (`--child timing`): forward + backward of one micro-batch of naive, ckpt,
ckpt+chunk (the pipeline's items) and HF + PEFT checkpointed, alternated round by round in one process (glibc's
default allocator settings for both); on CPU with one thread and in CPU seconds, which the load of a shared machine moves least, with the FLOPs of a step
(profiler) against one thread's matmul peak. The full runs' own (wall, multi-threaded) second-step times are printed
too; offload / checkpointing comes from them.

The loss working set is measured apart, in its own subprocess: torch's allocator peak of one forward + backward of
the loss alone at 4096 tokens, chunked ÷ plain.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import allocated_peak_bytes, machine, report  # noqa: E402

HIDDEN, LAYERS, VOCAB, STEPS = 256, 8, 128256, 2
from engine_throughput import ALPHA, RANK  # noqa: E402  (the same LoRA as the throughput benchmark)
CONFIGS = {"naive": ("false", 0), "ckpt": ("true", 0), "ckpt+chunk": ("true", 256),
           "offload": ('"offload"', 256)}
GIB = 2 ** 30
# The cap is checked against RSS_MARGIN x the prediction. (With glibc's dynamic mmap threshold the resident peak ran
# up to 1.5x `craft plan`'s bytes + baseline; with `craft train`'s allocator settings and the plan's measured loss
# term, naive at 1024 tokens was predicted 2.34 GiB and measured 2.60.)
RSS_MARGIN = 1.25
TIMING_ROUNDS = 3
PEAK_NAME = "resident (VmHWM)"  # what "peak" is: main() makes it "max_memory_allocated" on CUDA


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(field))


_CUDA_PEAK_BEFORE_RESET = 0  # `_allocator_peak` resets CUDA's peak statistics; the process peak keeps this


def _peak_bytes() -> int:
    import torch

    if torch.cuda.is_available():
        return max(_CUDA_PEAK_BEFORE_RESET, torch.cuda.max_memory_allocated())
    return _status_bytes("VmHWM:")


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


def _distinct_bytes(tensors) -> int:
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


class FirstCallPeak:
    """Patches `owner.method` so that its first call is measured: the bytes of `module_of(self)`'s parameters and
    buffers + the peak torch's allocator adds during the call (on CUDA `max_memory_allocated`, on CPU the profiler's
    memory events, as tests/test_engine_plan.py measures). Only the step is profiled: the setup around it runs
    threads whose frees the profiler misses."""

    def __init__(self, owner, method: str, module_of):
        self.peak, original = None, getattr(owner, method)

        def measured(this, *args, **kwargs):
            if self.peak is not None:
                return original(this, *args, **kwargs)
            held = _distinct_bytes([*module_of(this).parameters(), *module_of(this).buffers()])
            box = []
            self.peak = held + _allocator_peak(lambda: box.append(original(this, *args, **kwargs)))
            return box[0]

        setattr(owner, method, measured)


def _allocator_peak(region) -> int:
    import torch

    if torch.cuda.is_available():
        global _CUDA_PEAK_BEFORE_RESET
        _CUDA_PEAK_BEFORE_RESET = max(_CUDA_PEAK_BEFORE_RESET, torch.cuda.max_memory_allocated())
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        region()
        return torch.cuda.max_memory_allocated() - base
    return allocated_peak_bytes(region)


def child_craft(config_path: str, length: int, name: str, steps: int) -> dict:
    """One `craft train` run. Peaks: resident (VmHWM; on CUDA max_memory_allocated) and torch's tensor bytes of the
    first optimizer step (`FirstCallPeak`)."""
    from craft.engine import train as train_module
    from craft.engine.config import load_config

    checkpointing, chunk = CONFIGS[name]
    config = load_config(config_path, [f"sequence_len={length}", f"activation_checkpointing={checkpointing}",
                                       f"chunk_size={chunk}", f'output_dir="{Path(config_path).parent}/{name}"',
                                       f"max_steps={steps}"])
    tensors = FirstCallPeak(train_module.TrainingRun, "step", lambda run: run.module)
    summary = train_module.train(config, show_progress=False)
    records = [json.loads(line) for line in (Path(summary["run_dir"]) / "losses.jsonl").read_text().splitlines()]
    times = [length / r["train_tokens_per_second"] for r in records if "train_tokens_per_second" in r][1:]
    return {"peak": _peak_bytes(), "tensor_peak": tensors.peak,
            "step_seconds": statistics.median(times) if times else None}


def child_hf(config_path: str, length: int, steps: int) -> dict:
    from engine_throughput import hf_lora_step_times

    path = Path(config_path)
    sized = path.with_name(f"config_{length}.toml")
    sized.write_text(path.read_text().replace("sequence_len = 512", f"sequence_len = {length}"))
    from transformers import Trainer

    tensors = FirstCallPeak(Trainer, "training_step", lambda trainer: trainer.model)  # forward + backward
    times = hf_lora_step_times(sized, steps, 1, activation_checkpointing=True)
    return {"peak": _peak_bytes(), "tensor_peak": tensors.peak,
            "step_seconds": statistics.median(times[1:]) if steps > 1 else None}


def child_loss(length: int) -> dict:
    """Allocator peak of the loss alone (forward + backward) at `length` tokens: plain and chunked."""
    import torch

    from craft.engine.loss import DEFAULT_CHUNK_SIZE, causal_lm_loss
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
            out[name] = allocated_peak_bytes(region)
    return out


def child_timing(config_path: str, length: int, rounds: int) -> dict:
    """Forward + backward of one micro-batch for naive / ckpt / ckpt+chunk (the pipeline's items in this process)
    and HF + PEFT with checkpointing, alternated round by round so background load hits all alike; the median
    per configuration. (The optimizer step of a rank-16 LoRA is negligible next to these.)

    On CPU: one thread, CPU seconds of the process (what a shared machine's load changes least; wall seconds are
    kept too), with the C allocator's defaults for both: `craft train`'s settings (`craft.engine.allocator`) would
    apply to HF's steps in this process too, and their page faults on HF's full-vocabulary logits made HF 1.3x
    slower (4.25 vs ~3.2 CPU s), which would flatter craft. (With the defaults craft's own steps lose at most the
    few % the huge pages gave them.) Also the FLOPs of one step of each (profiler,
    `with_flops`: matmuls and attention) and the matmul peak of one thread: CPU seconds of a 2048^3 float32
    matmul. On CUDA: wall seconds after synchronising."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM

    from craft.engine.config import load_config
    from craft.engine.model import DTYPES, linear_module_names, load_stage
    from craft.engine.pipeline import sequential_loss

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if not cuda:
        torch.set_num_threads(1)
    config = load_config(config_path, [f"sequence_len={length}"])
    stage = load_stage(config, 0, 1)
    if cuda:  # the stage's own modules (the HF model's unused ones stay on the meta device)
        for module in (stage.base.model.embed_tokens, stage.base.model.layers, stage.base.model.norm,
                       stage.base.lm_head, stage.rotary):
            module.to(device)
    stage.model.train()
    hf = AutoModelForCausalLM.from_pretrained(config.model_dir, dtype=DTYPES[config.model_dtype]).to(device)
    hf = get_peft_model(hf, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=linear_module_names(hf),
                                       task_type="CAUSAL_LM"))
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hf.enable_input_require_grads()
    hf.train()
    ids = torch.randint(4, 384, (1, length), generator=torch.Generator().manual_seed(0)).to(device)

    def craft_step(name):
        checkpointing, chunk = CONFIGS[name]
        sequential_loss(stage, ids, ids, checkpointing={"false": False, "true": True}[checkpointing],
                        chunk_size=chunk).backward()

    steps = {"naive": lambda: craft_step("naive"), "ckpt": lambda: craft_step("ckpt"),
             "ckpt+chunk": lambda: craft_step("ckpt+chunk"), "hf": lambda: hf(input_ids=ids, labels=ids).loss.backward()}

    def clocks():
        if cuda:
            torch.cuda.synchronize()
        return time.process_time(), time.perf_counter()

    cpu, wall = {name: [] for name in steps}, {name: [] for name in steps}
    for round_index in range(rounds + 1):
        for name, step in steps.items():
            cpu_start, wall_start = clocks()
            step()
            cpu_end, wall_end = clocks()
            if round_index:  # the first round warms up
                cpu[name].append(cpu_end - cpu_start)
                wall[name].append(wall_end - wall_start)
    result = {"seconds": {name: statistics.median((wall if cuda else cpu)[name]) for name in steps},
              "wall": {name: statistics.median(wall[name]) for name in steps}, "clock": "wall" if cuda else "cpu"}
    flops = {}
    for name in ("ckpt+chunk", "hf"):
        with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
            steps[name]()
        flops[name] = sum(event.flops or 0 for event in prof.key_averages())
    result["flops"] = flops
    if not cuda:
        a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
        torch.matmul(a, b)
        start = time.process_time()
        for _ in range(5):
            torch.matmul(a, b)
        result["matmul_peak"] = 2 * 2048 ** 3 * 5 / (time.process_time() - start)
    return result


def child_baseline() -> dict:
    """Resident bytes of a process that has imported what a run imports (added to `craft plan`'s predictions)."""
    import deepspeed  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import craft.engine.train  # noqa: F401

    return {"rss": _status_bytes("VmRSS:")}


# ------------------------------------------------------------------------------------------------ parent


def run_child(*args: str) -> dict:
    """Run `--child ARGS` in a fresh interpreter. `craft train`'s children get the THP_MEM_ALLOC_ENABLE=1 the
    `craft train` command sets before torch is imported (craft.engine.allocator); the others run in the
    environment a user's program would have."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("THP_MEM_ALLOC_ENABLE", None)
    if args[0] == "craft":
        env["THP_MEM_ALLOC_ENABLE"] = "1"
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
    parser.add_argument("--lengths", default="1024,4096,8192",
                        help="sequence lengths; the checkpointed runs with the plain loss, offload and HF run at "
                             "1024 and 4096 only (the ratios' lengths)")
    parser.add_argument("--time-length", type=int, default=1024, help="the length at which step times are taken")
    parser.add_argument("--cap-gib", type=float, default=None,
                        help="skip runs predicted to need more (default: 11 on CPU, 90%% of the GPU's memory)")
    parser.add_argument("--results-json", default=None, help="also write the measurements to this file")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, rest = args.child[0], args.child[1:]
        result = {"craft": lambda: child_craft(rest[0], int(rest[1]), rest[2], int(rest[3])),
                  "hf": lambda: child_hf(rest[0], int(rest[1]), int(rest[2])), "loss": lambda: child_loss(int(rest[0])),
                  "timing": lambda: child_timing(rest[0], int(rest[1]), int(rest[2])),
                  "baseline": child_baseline}[kind]()
        print(json.dumps(result))
        return

    global PEAK_NAME
    PEAK_NAME = "max_memory_allocated" if _cuda() else PEAK_NAME
    lengths = [int(n) for n in args.lengths.split(",")]
    if args.cap_gib is None:
        import torch

        args.cap_gib = 0.9 * torch.cuda.get_device_properties(0).total_memory / GIB if _cuda() else 11.0
    timed = args.time_length
    plan_lengths = {"naive": lengths, "ckpt": [timed], "ckpt+chunk": lengths, "offload": [timed],
                    "hf": [n for n in lengths if n <= 4096]}
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
                if RSS_MARGIN * predicted > args.cap_gib * GIB:
                    results[name][length] = {"skipped": predicted}
                    print(f"{name:>10} @ {length:5d}: not run: predicted {predicted / GIB:.1f} GiB", flush=True)
                    continue
                steps = str(STEPS if length == timed else 1)
                child = ("hf", str(config_path), str(length), steps) if name == "hf" else \
                    ("craft", str(config_path), str(length), name, steps)
                result = run_child(*child)
                result["predicted"], result["baseline"] = predicted, baseline
                results[name][length] = result
                timing = f", step {result['step_seconds']:6.2f} s" if result["step_seconds"] else ""
                print(f"{name:>10} @ {length:5d}: {PEAK_NAME} peak {result['peak'] / GIB:6.2f} GiB (plan + baseline "
                      f"{predicted / GIB:6.2f}), tensor peak {result['tensor_peak'] / GIB:6.2f} GiB{timing}",
                      flush=True)
        loss = run_child("loss", "4096") if 4096 in lengths else {}
        print(f"loss alone @ 4096: {loss}", flush=True)
        timing = run_child("timing", str(config_path), str(timed), str(TIMING_ROUNDS))
        print(f"timing @ {timed}: {timing}", flush=True)
    if args.results_json:
        Path(args.results_json).write_text(json.dumps({"results": results, "loss": loss, "timing": timing}))
    summarize(results, loss, timing, timed)


def summarize_json(path: str, timed: int = 1024) -> None:
    """Print the RESULT lines again from a `--results-json` file (JSON keys are strings)."""
    data = json.loads(Path(path).read_text())
    results = {name: {int(n): r for n, r in by_length.items()} for name, by_length in data["results"].items()}
    summarize(results, data["loss"], data["timing"], timed)


def summarize(results: dict, loss: dict, timing: dict, timed: int) -> None:
    def peak(name, length, kind="peak"):
        return results[name].get(length, {}).get(kind)

    logits_copy = (4096 - 1024) * VOCAB * 4
    tensor_note = "" if _cuda() else " (resident; see the tensor-bytes row)"
    if peak("ckpt+chunk", 4096) and peak("ckpt+chunk", 1024):
        growth = peak("ckpt+chunk", 4096) - peak("ckpt+chunk", 1024)
        report(f"craft train peak growth 1024 -> 4096 tokens / one float32 copy of the extra tokens' logits"
               f"{tensor_note}", growth / logits_copy, "<= 0.15",
               f"{growth / 2**20:+.0f} MiB vs {logits_copy / 2**20:.0f} MiB ({peak('ckpt+chunk', 1024) / GIB:.2f} -> "
               f"{peak('ckpt+chunk', 4096) / GIB:.2f} GiB {PEAK_NAME}); checkpointing + chunked loss, vocab {VOCAB}; "
               f"the {timed}-token run makes {STEPS} optimizer steps, the others 1")
        if not _cuda():
            grown = peak("ckpt+chunk", 4096, "tensor_peak") - peak("ckpt+chunk", 1024, "tensor_peak")
            report("craft train peak growth 1024 -> 4096 tokens / one float32 logits copy (torch tensor bytes)",
                   grown / logits_copy, "<= 0.15", f"{grown / 2**20:+.0f} MiB: parameters and buffers + torch's "
                   "allocator peak of the first optimizer step (`allocated_peak_bytes`)")
    if peak("naive", 4096) and peak("naive", 1024):
        naive_growth = peak("naive", 4096) - peak("naive", 1024)
        report("naive (no checkpointing, plain loss) peak growth 1024 -> 4096 / one float32 logits copy",
               naive_growth / logits_copy, "", f"+{naive_growth / GIB:.2f} GiB ({peak('naive', 1024) / GIB:.2f} -> "
               f"{peak('naive', 4096) / GIB:.2f} GiB {PEAK_NAME}): the before-picture")
    if loss:
        report("loss working set at 4096 tokens, vocab 128256: chunked / plain", loss["chunked"] / loss["plain"],
               "<= 0.125", f"{loss['chunked'] / 2**20:.0f} MiB vs {loss['plain'] / 2**20:.0f} MiB (allocator peak of "
                           "the loss's forward + backward alone)")
    seconds, wall, clock = timing["seconds"], timing["wall"], timing["clock"]
    how = (f"{clock} seconds of forward + backward, 1 thread, alternated in one process (`--child timing`, median "
           f"of {TIMING_ROUNDS}, glibc's default allocator settings for both)") if clock == "cpu" else "wall seconds of forward + backward, alternated in one process"

    def detail(a, b):
        return f"{seconds[a]:.2f} vs {seconds[b]:.2f} s ({how}; wall {wall[a]:.2f} vs {wall[b]:.2f} s)"

    report(f"step time with checkpointing / without ({timed} tokens, plain loss)", seconds["ckpt"] / seconds["naive"],
           "<= 1.4", detail("ckpt", "naive"))
    report(f"step time checkpointing + chunked loss / neither ({timed} tokens)",
           seconds["ckpt+chunk"] / seconds["naive"], "<= 1.4", detail("ckpt+chunk", "naive"))
    report(f"craft train / HF Trainer + PEFT, both checkpointed: tokens/s ({timed} tokens)",
           seconds["hf"] / seconds["ckpt+chunk"], ">= 1.0", detail("ckpt+chunk", "hf"))
    if "matmul_peak" in timing:
        rate = timing["flops"]["ckpt+chunk"] / seconds["ckpt+chunk"]
        report(f"craft train forward + backward FLOP/s / one thread's matmul peak ({timed} tokens)",
               rate / timing["matmul_peak"], "",
               f"{timing['flops']['ckpt+chunk'] / 1e9:.0f} GFLOP (profiler, matmuls + attention; HF "
               f"{timing['flops']['hf'] / 1e9:.0f}) in {seconds['ckpt+chunk']:.2f} CPU s = {rate / 1e9:.1f} GFLOP/s; "
               f"peak {timing['matmul_peak'] / 1e9:.1f} GFLOP/s = a 2048^3 float32 matmul, 1 thread")
    full_runs = {name: r[timed]["step_seconds"] for name, r in results.items()
                 if r.get(timed, {}).get("step_seconds")}
    print("second-step wall seconds of the full runs (threads as torch sets them, machine load included): "
          + ", ".join(f"{name} {value:.2f}" for name, value in full_runs.items()))
    if full_runs.get("ckpt+chunk") and full_runs.get("offload"):
        report(f"step time offload / checkpointing ({timed} tokens, chunked loss)",
               full_runs["offload"] / full_runs["ckpt+chunk"], "", "second step of the full runs, wall")
    for length in sorted(set(results["hf"]) | set(results["ckpt+chunk"])):
        if peak("hf", length) and peak("ckpt+chunk", length):
            report(f"craft train / HF Trainer + PEFT, both checkpointed: peak memory ({length} tokens)",
                   peak("ckpt+chunk", length) / peak("hf", length), "<= 1.0",
                   f"{PEAK_NAME} {peak('ckpt+chunk', length) / GIB:.2f} vs {peak('hf', length) / GIB:.2f} GiB; "
                   f"tensor peak {peak('ckpt+chunk', length, 'tensor_peak') / GIB:.2f} vs "
                   f"{peak('hf', length, 'tensor_peak') / GIB:.2f} GiB")
    for name, by_length in results.items():
        for length, result in sorted(by_length.items()):
            if "skipped" in result:
                print(f"{name} @ {length}: not run: predicted {result['skipped'] / GIB:.1f} GiB")
    ours = {length: r for length, r in results["ckpt+chunk"].items() if "peak" in r}
    if ours:
        worst = max(abs(r["predicted"] / r["peak"] - 1) for r in ours.values())
        report(f"craft plan prediction (+ process baseline) vs measured {PEAK_NAME} peak, checkpointing + chunked "
               "loss: largest relative error", worst, "<= 0.25",
               ", ".join(f"{n}: {r['predicted'] / GIB:.2f} vs {r['peak'] / GIB:.2f} GiB" for n, r in sorted(ours.items())))
        if not _cuda() and all(r.get("tensor_peak") for r in ours.values()):
            baseline = next(iter(ours.values()))["baseline"]
            worst = max(abs((r["predicted"] - baseline) / r["tensor_peak"] - 1) for r in ours.values())
            report("craft plan prediction vs measured torch tensor peak (first optimizer step), checkpointing + "
                   "chunked loss: largest relative error", worst, "<= 0.25",
                   ", ".join(f"{n}: {(r['predicted'] - baseline) / GIB:.2f} vs {r['tensor_peak'] / GIB:.2f} GiB"
                             for n, r in sorted(ours.items())))

if __name__ == "__main__":
    main()
