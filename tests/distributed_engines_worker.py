"""CRAFT on every data-parallel engine against one process on the global batch (tests/test_distributed_engines.py).

`torchrun --nproc_per_node 2 tests/distributed_engines_worker.py OUT ENGINE[,ENGINE...]` trains, for each engine
(ddp, zero2, zero3, fsdp2) and each case of `CASES` (paired, self-align, GradCache; full fine-tuning and LoRA),
a tiny Llama for `STEPS` SGD steps on 2 CPU ranks (gloo), each rank reading its half of every global batch.
The trainable parameters (model, projection head, temperature) are then gathered where the engine shards them
(ZeRO-3: `GatheredParameters`; FSDP2: `DTensor.full_tensor`) and rank 0 writes OUT/ENGINE-CASE.pt; the messages
of combinations refused before training (`craft.engines`) go to OUT/refused.pt. Without ENGINE arguments it
runs the same cases in this one process on the global batches (the reference).
"""

from __future__ import annotations

import os
import sys

import torch
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers import TrainerCallback

sys.path.insert(0, os.path.dirname(__file__))
from craft_scale_helpers import COLLATE, chat_rows, pair_rows  # noqa: E402

from craft.config import CRAFTSFTConfig  # noqa: E402
from craft.data import make_craft_datasets  # noqa: E402
from craft.testing import make_tokenizer, tiny_model  # noqa: E402
from craft.trainers import CRAFTSFTTrainer  # noqa: E402

STEPS = 5
RESUME_STEPS, SAVE_STEP = 4, 2
RANK_BATCH = 2
WORLD = 2
CASES = {
    "paired_full": dict(strategy="paired_dataset"),
    "self_align_full": dict(strategy="self_align"),
    "gradcache_full": dict(strategy="paired_dataset", craft_use_gradcache=True, craft_gradcache_chunk_size=1),
    "paired_lora": dict(strategy="paired_dataset", lora=True),
    "self_align_lora": dict(strategy="self_align", lora=True),
    "gradcache_lora": dict(strategy="paired_dataset", lora=True, craft_use_gradcache=True,
                           craft_gradcache_chunk_size=1),
}
ENGINES = {
    "ddp": {},
    "zero2": {"deepspeed": {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto",
                            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}},
    "zero3": {"deepspeed": {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto",
                            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}},
    # On CPU FSDP2 saves sharded state dicts only (craft.engines.enable_cpu_fsdp2).
    "fsdp2": {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2, "reshard_after_forward": True,
                                                    "state_dict_type": "SHARDED_STATE_DICT",
                                                    "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                                    "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}},
}


RESUMED_ENGINES = ("ddp", "zero2", "zero3", "fsdp2")


def _model(lora: bool):
    torch.manual_seed(0)
    model = tiny_model("llama")
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 lora_dropout=0.0))
    return model


def _loader(rows, rank: int | None):
    """Global batches of WORLD * RANK_BATCH rows in order; ``rank`` takes its slice of each (None: all of it)."""
    size = WORLD * RANK_BATCH
    if rank is not None:
        rows = [row for start in range(0, len(rows), size) for row in rows[start:start + size]
                [rank * RANK_BATCH:(rank + 1) * RANK_BATCH]]
    return DataLoader(rows, batch_size=RANK_BATCH if rank is not None else size, shuffle=False, collate_fn=COLLATE)


def train(case: str, out: str, rank: int | None, engine_settings: dict):
    settings = dict(CASES[case])
    strategy, lora = settings.pop("strategy"), settings.pop("lora", False)
    sft, pairs = chat_rows(WORLD * RANK_BATCH * 2 * STEPS, seed=1), pair_rows(WORLD * RANK_BATCH * STEPS, seed=2)
    paired = strategy == "paired_dataset"
    bundle = make_craft_datasets(sft, contrastive_dataset=pairs if paired else None, strategy=strategy)
    # Before the config: a ZeRO-3 config makes transformers build models under deepspeed.zero.Init, whose
    # partitioned initialisation draws other random numbers than the reference's.
    model = _model(lora)
    args = CRAFTSFTConfig(output_dir=out, per_device_train_batch_size=RANK_BATCH if rank is not None else 4,
                          gradient_accumulation_steps=2, max_steps=STEPS, optim="sgd", learning_rate=0.05,
                          weight_decay=0.0, max_grad_norm=0.0, lr_scheduler_type="constant", use_cpu=True,
                          report_to=[], bf16=False, logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True,
                          gradient_checkpointing=False, craft_projection_dim=16, craft_temperature=0.1,
                          craft_learnable_temperature=True, craft_beta=0.5, **settings, **engine_settings)
    trainer = CRAFTSFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(sft), craft_bundle=bundle,
                              data_collator=COLLATE, processing_class=make_tokenizer(),
                              craft_sft_loader=_loader(sft, rank),
                              craft_contrastive_loader=_loader(pairs, rank) if paired else None)
    trainer.train()
    return trainer, _full_parameters(trainer)


def _full_parameters(trainer) -> dict[str, torch.Tensor]:
    """{name: full tensor} of the trainable parameters, gathered from ZeRO-3 partitions or FSDP2 shards."""
    named = [(name, p) for name, p in trainer.model.named_parameters() if p.requires_grad]
    if trainer.is_deepspeed_enabled:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            return {name: p.detach().clone().reshape(-1) for name, p in named}
    values = {}
    for name, p in named:
        tensor = p.full_tensor() if hasattr(p, "full_tensor") else p
        values[name] = tensor.detach().clone().reshape(-1)
    return values


class _QueueAt(TrainerCallback):
    """Records the objective's queue (oldest first) when training starts (after a resume restored it) and after
    every optimizer step, and saves a checkpoint after step SAVE_STEP."""

    def __init__(self, trainer):
        self.trainer, self.queues = trainer, {}

    def on_train_begin(self, args, state, control, **kwargs):
        self._record(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self._record(state.global_step)
        control.should_save = state.global_step == SAVE_STEP

    def _record(self, step: int) -> None:
        queue = self.trainer.craft_queue.ordered()
        self.queues[step] = torch.zeros(0) if queue is None else queue.cpu().clone()


def resume(engine: str, out: str) -> dict:
    """Paired + MoCo queue + loss_scale balancing for RESUME_STEPS steps, checkpointed at SAVE_STEP, then a fresh
    trainer resumed from that checkpoint: {"full"|"resumed": {"queues": {step: queue}, "losses": {step: loss}}}.
    The data comes from the trainer's own loaders (seeded, sharded per rank), so the resumed run reads what the
    uninterrupted one read."""
    sft, pairs = Dataset.from_list(chat_rows(16, seed=1)), Dataset.from_list(pair_rows(16, seed=2))
    results = {}
    for run in ("full", "resumed"):
        model = _model(False)
        args = CRAFTSFTConfig(output_dir=os.path.join(out, engine, "resume", run), per_device_train_batch_size=2,
                              gradient_accumulation_steps=2, max_steps=RESUME_STEPS, optim="sgd", learning_rate=0.05,
                              max_grad_norm=0.0, lr_scheduler_type="constant", use_cpu=True, report_to=[], bf16=False,
                              logging_steps=1, save_strategy="steps", save_steps=10 ** 6, seed=0, disable_tqdm=True,
                              craft_projection_dim=16, craft_temperature=0.1, craft_learnable_temperature=True,
                              craft_beta=0.5, craft_negative_strategy="queue", craft_negative_queue_size=6,
                              craft_gradient_balancing="loss_scale", ddp_backend="gloo", **ENGINES[engine])
        trainer = CRAFTSFTTrainer(model=model, args=args, train_dataset=sft, processing_class=make_tokenizer(),
                                  craft_bundle=make_craft_datasets(sft, contrastive_dataset=pairs),
                                  data_collator=COLLATE)
        record = _QueueAt(trainer)
        trainer.add_callback(record)
        checkpoint = os.path.join(out, engine, "resume", "full", f"checkpoint-{SAVE_STEP}")
        trainer.train(resume_from_checkpoint=checkpoint if run == "resumed" else None)
        losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
        results[run] = {"queues": record.queues, "losses": losses,
                        "balancing": trainer.craft_balancing.state_dict()["balancer"]}
        del trainer
        _reset_accelerate()
    return results


def _reset_accelerate() -> None:
    """Let the next trainer of this process build its own Accelerator (another engine)."""
    from accelerate.state import AcceleratorState, GradientState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    unset_hf_deepspeed_config()
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)


def main() -> None:
    out = sys.argv[1]
    if len(sys.argv) < 3:
        for case in CASES:
            _, params = train(case, os.path.join(out, case), None, {})
            torch.save(params, os.path.join(out, f"reference-{case}.pt"))
        return
    import torch.distributed as dist

    from craft.errors import UserError

    refused = {}
    for engine in sys.argv[2].split(","):
        for case in CASES:
            settings = {"ddp_backend": "gloo", **ENGINES[engine]}
            try:
                trainer, params = train(case, os.path.join(out, engine, case), int(os.environ["RANK"]), settings)
            except UserError as error:  # refused before training (craft.engines)
                refused[f"{engine}-{case}"] = str(error)
            else:
                if dist.get_rank() == 0:
                    torch.save(params, os.path.join(out, f"{engine}-{case}.pt"))
                del trainer
            _reset_accelerate()
        if engine in RESUMED_ENGINES:
            resumed = resume(engine, out)
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, resumed)
            if dist.get_rank() == 0:
                torch.save(gathered, os.path.join(out, f"resume-{engine}.pt"))
    if dist.get_rank() == 0:
        torch.save(refused, os.path.join(out, "refused.pt"))
    from craft.shutdown import end_launched_process

    end_launched_process(0)  # barrier, destroy, and no Python finalization racing the engines' gloo threads


if __name__ == "__main__":
    main()
