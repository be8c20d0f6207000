"""Worker of bench/craft_distributed.py: `torchrun --nproc_per_node 2 bench/craft_distributed_worker.py OUT ENGINE`.

On each rank, for one engine (ddp, zero2, zero3, zero3_bf16, fsdp2), fully fine-tunes the same Llama (hidden
512, 4 layers, vocab 8192: 17.8 M parameters + 0.3 M of the objective, float32 (zero3_bf16: bf16 mixed precision),
AdamW) with CRAFT self-align for MEASURED_STEP + 1 steps and measures, right before the optimizer update of
the last step (gradients reduced, activations freed: the most model state a rank holds):

* ``held``: the bytes of every distinct tensor storage alive in the process (found by walking the garbage
  collector's objects; DTensors by their local shard): parameters or their shards, gradients or their partitions,
  the optimizer's states, DeepSpeed's fp32 master partitions and buckets, plus DDP's gradient buckets, which only
  C++ holds (their sizes from DDP's own logging data, `ddp_bucket_bytes`);
* ``params``: the bytes of the parameters this rank stores (ZeRO-3: its partition ``ds_tensor``, plus the full
  tensor of persistent parameters; FSDP2: the local shard; otherwise the whole tensor);
* ``optimizer``: the bytes of the optimizer's state tensors (AdamW's two moments, on DeepSpeed its partitions);
* ``peak_rss``: the process's peak resident set size (``ru_maxrss``) at the end.

Rank r writes OUT/ENGINE-rank{r}.json with these numbers and the parameter count.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sys

import torch
from datasets import Dataset
from transformers import TrainerCallback

from craft.config import CRAFTSFTConfig
from craft.data import CRAFTCollator, make_craft_datasets
from craft.testing import make_tokenizer, tiny_model, toy_chat_rows
from craft.trainers import CRAFTSFTTrainer

# Buckets of 5e5 elements (2 MB): DeepSpeed's defaults (5e8) would allocate 2 GB buffers for this model, and
# even 5e6 (20 MB each) is a fixed cost of the order of the model state of a 17.8 M-parameter model.
BUCKET = 5e5
DEEPSPEED = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
             "gradient_clipping": "auto"}
ENGINES = {
    "ddp": {},
    "zero2": {"deepspeed": {**DEEPSPEED, "zero_optimization": {"stage": 2, "reduce_bucket_size": BUCKET,
                                                               "allgather_bucket_size": BUCKET}}},
    "zero3": {"deepspeed": {**DEEPSPEED, "zero_optimization": {"stage": 3, "reduce_bucket_size": BUCKET,
                                                               "stage3_prefetch_bucket_size": BUCKET,
                                                               "stage3_param_persistence_threshold": 1e4}}},
    # Mixed precision as on a GPU: DeepSpeed keeps bf16 weights (and gradients) and an fp32 master partition.
    "zero3_bf16": {"bf16": True, "deepspeed": {**DEEPSPEED, "bf16": {"enabled": "auto"},
                                               "zero_optimization": {"stage": 3, "reduce_bucket_size": BUCKET,
                                                                     "stage3_prefetch_bucket_size": BUCKET,
                                                                     "stage3_param_persistence_threshold": 1e4}}},
    "fsdp2": {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2, "reshard_after_forward": True,
                                                    "state_dict_type": "SHARDED_STATE_DICT",  # CPU: craft.engines
                                                    "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                                    "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}},
}
MEASURED_STEP = 2  # measured before the update of the third optimizer step


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


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters this rank stores: ZeRO-3 partitions (and full persistent ones), FSDP2 shards."""
    total = 0
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):
            total += _nbytes(p.ds_tensor) + (_nbytes(p.data) if getattr(p, "ds_persist", False) else 0)
        elif hasattr(p, "to_local"):
            total += _nbytes(p.to_local())
        else:
            total += _nbytes(p)
    return total


def ddp_bucket_bytes(wrapped) -> int:
    """Bytes of DDP's flat gradient buckets (0 for other engines, or when gradients are views into the buckets):
    the reducer allocates them in C++, where the garbage collector cannot see them."""
    if not isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
        return 0
    data = wrapped._get_ddp_logging_data()
    if data.get("gradient_as_bucket_view"):
        return 0
    return sum(int(size) for size in str(data.get("bucket_sizes", "")).split(",") if size)


def optimizer_bytes(optimizer) -> int:
    """Bytes of the state tensors of the torch optimizer at the bottom of the engine's wrappers."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    tensors = [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    return sum(_nbytes(t.to_local() if hasattr(t, "to_local") else t) for t in tensors if t.dim() > 0)


class Measure(TrainerCallback):
    """Wraps the engine's optimizer step (DeepSpeed: its engine's `step`, run inside the backward; otherwise the
    optimizer's) to measure right before the update of step MEASURED_STEP + 1."""

    def __init__(self):
        self.result, self.trainer = {}, None

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        owner = trainer.model_wrapped if trainer.is_deepspeed_enabled else trainer.optimizer
        step = owner.step

        def measured_step(*a, **k):
            if state.global_step == MEASURED_STEP and not self.result:
                buckets = ddp_bucket_bytes(trainer.model_wrapped)
                self.result = {"held": held_bytes() + buckets, "buckets": buckets,
                               "params": parameter_bytes(trainer.model),
                               "optimizer": optimizer_bytes(trainer.optimizer)}
            return step(*a, **k)

        owner.step = measured_step


def run(engine: str, out: str) -> dict:
    model = tiny_model("llama", vocab_size=8192, hidden_size=512, num_layers=4)  # before the config: see tests
    count = sum(p.numel() for p in model.parameters())
    sft = Dataset.from_list(toy_chat_rows(64, seed=1))
    args = CRAFTSFTConfig(output_dir=os.path.join(out, engine), per_device_train_batch_size=2,
                          gradient_accumulation_steps=1, max_steps=MEASURED_STEP + 1, use_cpu=True, report_to=[],
                          save_strategy="no", disable_tqdm=True, gradient_checkpointing=False,
                          ddp_backend="gloo", max_grad_norm=0.0, craft_projection_dim=128,
                          **{"bf16": False, **ENGINES[engine]})
    measure = Measure()
    trainer = CRAFTSFTTrainer(
        model=model, args=args, train_dataset=sft, craft_bundle=make_craft_datasets(sft, strategy="self_align"),
        data_collator=CRAFTCollator(pad_token_id=3), processing_class=make_tokenizer(), callbacks=[measure])
    measure.trainer = trainer
    trainer.train()
    objective = sum(getattr(p, "ds_numel", p.numel()) for p in trainer.craft_objective.parameters())
    del trainer, model
    gc.collect()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    return {**measure.result, "peak_rss": peak_rss, "parameters": count + objective}


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
