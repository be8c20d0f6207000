"""Worker of bench/craft_distributed.py: `torchrun --nproc_per_node 2 bench/craft_distributed_worker.py OUT ENGINE`.

On each rank, for one engine (ddp, zero2, zero3), trains the same Llama (hidden 512, 4 layers, vocab
8192: 21 M parameters, float32, AdamW) with CRAFT self-align for 3 steps and measures, at the start of step 3:

* ``held``: the bytes of every distinct tensor storage alive in the process (parameters or their shards,
  optimizer states, gradient buffers, engine partitions; found by walking the garbage collector's objects);
* ``peak``: ``held`` plus the peak of torch's CPU allocator during step 3 (profiler memory events): model state
  plus the step's gradients, activations and optimizer temporaries.

Rank r writes OUT/ENGINE-rank{r}.json: {"held": bytes, "peak": bytes}.
"""

from __future__ import annotations

import gc
import json
import os
import sys

import torch
from datasets import Dataset
from transformers import TrainerCallback

from craft.config import CRAFTSFTConfig
from craft.data import CRAFTCollator, make_craft_datasets
from craft.testing import make_tokenizer, tiny_model, toy_chat_rows

ENGINES = {
    "ddp": {},
    # Buckets of 5e6 elements (20 MB): DeepSpeed's defaults, 5e8, would allocate 2 GB buffers for this model.
    "zero2": {"deepspeed": {"zero_optimization": {"stage": 2, "reduce_bucket_size": 5e6,
                                                  "allgather_bucket_size": 5e6},
                            "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                            "gradient_clipping": "auto"}},
    "zero3": {"deepspeed": {"zero_optimization": {"stage": 3, "reduce_bucket_size": 5e6,
                                                  "stage3_prefetch_bucket_size": 5e6,
                                                  "stage3_param_persistence_threshold": 1e4},
                            "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                            "gradient_clipping": "auto"}},
}
MEASURED_STEP = 2  # global_step at the start of the third optimizer step


def held_bytes() -> int:
    """Bytes of the distinct storages of every tensor the garbage collector can reach (DTensor shards included)."""
    gc.collect()
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor):
                continue
            tensor = obj.to_local() if hasattr(obj, "to_local") else obj
            storage = tensor.untyped_storage()
        except Exception:  # meta tensors, tensors without storage
            continue
        if storage.data_ptr() == 0 or storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


class Measure(TrainerCallback):
    """held at the start of step MEASURED_STEP + 1; the profiler runs from there to that step's end."""

    def __init__(self):
        self.result, self._profile, self._held = {}, None, 0

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == MEASURED_STEP and self._profile is None:
            from torch.profiler import ProfilerActivity, profile

            self._held = held_bytes()
            self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._profile.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self._profile is not None and not self.result:
            self._profile.__exit__(None, None, None)
            running = peak = 0
            for event in sorted(self._profile.events(), key=lambda e: e.time_range.start):
                running += event.self_cpu_memory_usage
                peak = max(peak, running)
            self.result = {"held": self._held, "peak": self._held + peak}


def run(engine: str, out: str) -> dict:
    model = tiny_model("llama", vocab_size=8192, hidden_size=512, num_layers=4)  # before the config: see tests
    rows = toy_chat_rows(64, seed=1)
    sft = Dataset.from_list(rows)
    args = CRAFTSFTConfig(output_dir=os.path.join(out, engine), per_device_train_batch_size=2,
                          gradient_accumulation_steps=1, max_steps=MEASURED_STEP + 1, use_cpu=True, report_to=[],
                          bf16=False, save_strategy="no", disable_tqdm=True, gradient_checkpointing=False,
                          ddp_backend="gloo", max_grad_norm=0.0, craft_projection_dim=128, **ENGINES[engine])
    measure = Measure()
    trainer = __import__("craft.trainers", fromlist=["CRAFTSFTTrainer"]).CRAFTSFTTrainer(
        model=model, args=args, train_dataset=sft, craft_bundle=make_craft_datasets(sft, strategy="self_align"),
        data_collator=CRAFTCollator(pad_token_id=3), processing_class=make_tokenizer(), callbacks=[measure])
    trainer.train()
    del trainer, model
    gc.collect()
    return measure.result


def main() -> None:
    import torch.distributed as dist

    out, engine = sys.argv[1], sys.argv[2]
    result = run(engine, out)
    with open(os.path.join(out, f"{engine}-rank{dist.get_rank()}.json"), "w") as handle:
        json.dump(result, handle)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
