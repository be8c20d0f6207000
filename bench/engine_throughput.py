"""Training throughput of `craft train` (LoRA, DeepSpeed pipeline engine, 1 stage) vs HF Trainer + PEFT.

Command (from the repository root):

    HF_HUB_OFFLINE=1 .venv/bin/python bench/engine_throughput.py [--steps 10] [--sequence_len 256]

Same model (Llama, 8 layers, hidden 256, random weights), same packed sequences (built by `craft.engine.data`),
same LoRA (rank 16 on every linear map of the decoder layers, alpha = 4), micro-batch 1, gradient accumulation 4,
float32, same thread count. Both run in this one process, alternately (craft, HF, HF, craft), and each side's
best median step time counts, so background load hits both alike.

Reported:
* tokens/s of craft train / tokens/s of HF Trainer (goal >= 1.0);
* the fraction of this machine's matmul peak that `craft train` reaches. The peak is the float32 FLOP/s of a
  2048 x 2048 `torch.matmul`; the model FLOPs per token of LoRA training are taken as 4 * P (forward 2P + the
  backward pass through the frozen weights 2P; full fine-tuning would be 6P), P = the parameters of the decoder
  layers and lm_head (the embedding is a lookup), LoRA's own and attention's (seq-dependent) FLOPs left out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, report  # noqa: E402

RANK, ALPHA, ACCUMULATION = 16, 4.0, 4


def matmul_peak_flops(size: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.matmul(a, b)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.matmul(a, b)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def setup(root: Path, sequence_len: int, steps: int) -> tuple[Path, int]:
    from craft.testing import save_tiny_model, toy_texts

    save_tiny_model(root / "model", "llama", hidden_size=256, num_layers=8)
    texts = toy_texts(4000, "pirate") + toy_texts(4000, "formal", seed=1)
    documents = [" ".join(texts[i:i + 20]) for i in range(0, len(texts), 20)]
    (root / "data.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in documents))
    config = f"""
model_dir = "{root / 'model'}"
output_dir = "{root / 'out'}"
lora_rank = {RANK}
lora_alpha = {ALPHA}
lr = 1e-4
sequence_len = {sequence_len}
gradient_accumulation_steps = {ACCUMULATION}
model_dtype = "float32"
eval_fraction = 0.0
evals_per_run = 0
max_steps = {steps}
[[datasets]]
dataset_path = "{root / 'data.jsonl'}"
"""
    (root / "config.toml").write_text(config)
    return root / "config.toml", sequence_len * ACCUMULATION


def craft_step_seconds(config_path: Path, tag: str) -> float:
    """Median optimizer-step time of a `craft train` run (first two steps excluded)."""
    from craft.engine.config import load_config
    from craft.engine.train import train

    config = load_config(config_path, [f'output_dir="{config_path.parent / tag}"'])
    summary = train(config, show_progress=False)
    records = [json.loads(line) for line in (Path(summary["run_dir"]) / "losses.jsonl").read_text().splitlines()]
    rates = [r["train_tokens_per_second"] for r in records if "train_tokens_per_second" in r][2:]
    tokens_per_step = config.sequence_len * ACCUMULATION
    return statistics.median(tokens_per_step / rate for rate in rates)


def hf_step_seconds(config_path: Path, steps: int) -> float:
    """Median optimizer-step time of HF Trainer + PEFT LoRA on the same rows (first two steps excluded)."""
    return statistics.median(hf_lora_step_times(config_path, steps, ACCUMULATION)[2:])


def hf_lora_step_times(config_path: Path, steps: int, accumulation: int, **training_args) -> list[float]:
    """Step times of HF Trainer + PEFT LoRA (rank RANK, alpha ALPHA, every linear map of the decoder layers) on
    the rows `craft train` builds from `config_path`, in the config's model dtype; `training_args` are passed on
    to `TrainingArguments` (e.g. activation_checkpointing=True)."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from craft.engine.config import load_config
    from craft.engine.data import build_rows
    from craft.engine.model import DTYPES, linear_module_names

    config = load_config(config_path)
    rows = build_rows(config, AutoTokenizer.from_pretrained(config.model_dir))
    dataset = Dataset.from_dict({k: rows[k] for k in ("input_ids", "labels", "attention_mask")})
    model = AutoModelForCausalLM.from_pretrained(config.model_dir, dtype=DTYPES[config.model_dtype])
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=linear_module_names(model),
                                             task_type="CAUSAL_LM"))

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    timer = StepTimer()
    settings = dict(use_cpu=not torch.cuda.is_available(), bf16=config.model_dtype == "bfloat16")
    settings.update(training_args)
    args = TrainingArguments(output_dir=str(config_path.parent / "hf"), per_device_train_batch_size=1,
                             gradient_accumulation_steps=accumulation, max_steps=steps, learning_rate=1e-4,
                             report_to=[], save_strategy="no", logging_strategy="no", dataloader_num_workers=0,
                             disable_tqdm=True, seed=42, **settings)
    Trainer(model=model, args=args, train_dataset=dataset, callbacks=[timer]).train()
    return timer.times


def decoder_and_head_params(model_dir: Path) -> int:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--sequence_len", type=int, default=256)
    args = parser.parse_args()
    print(machine(), f"threads={torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        config_path, tokens_per_step = setup(Path(tmp), args.sequence_len, args.steps)
        craft_times = [craft_step_seconds(config_path, "craft_a")]
        hf_times = [hf_step_seconds(config_path, args.steps), hf_step_seconds(config_path, args.steps)]
        craft_times.append(craft_step_seconds(config_path, "craft_b"))
        params = decoder_and_head_params(Path(tmp) / "model")
    craft_rate, hf_rate = tokens_per_step / min(craft_times), tokens_per_step / min(hf_times)
    peak = matmul_peak_flops()
    fraction = 4 * params * craft_rate / peak
    print(f"craft train: {craft_rate:,.0f} tokens/s (step times {', '.join(f'{t:.3f}' for t in craft_times)} s)")
    print(f"HF Trainer:  {hf_rate:,.0f} tokens/s (step times {', '.join(f'{t:.3f}' for t in hf_times)} s)")
    print(f"matmul peak {peak / 1e9:,.1f} GFLOP/s; P = {params:,}; craft at 4P FLOPs/token: {fraction:.1%}")
    report("craft train (LoRA) tokens/s / HF Trainer + PEFT tokens/s", craft_rate / hf_rate, ">= 1.0",
           f"llama 8x256, seq {args.sequence_len}, GA {ACCUMULATION}, rank {RANK}, float32")
    report("craft train (LoRA) fraction of matmul peak (4P FLOPs/token)", fraction, "",
           f"peak {peak / 1e9:.1f} GFLOP/s from a 2048^2 float32 matmul")


if __name__ == "__main__":
    main()
