"""Worker of tests/test_multiprocess_craft.py: `torchrun --nproc_per_node 2 tests/multiprocess_craft_worker.py OUT`.

Runs three short CRAFT trainings on every rank (gloo, CPU), one after the other:

* ``paired_gradcache`` — paired strategy, GradCache (chunks of 2), negative queue, learnable temperature;
* ``self_align`` — self-align strategy (SFT and InfoNCE from one forward);
* ``self_align_pcgrad`` — self-align with PCGrad (per-task gradients averaged over ranks by hand).

After each, every trainable parameter (model and CRAFT modules) is gathered from both ranks, and the input rows
each rank trained on are exchanged. Rank 0 writes OUT/result.json: per mode, the largest parameter difference
across ranks, whether the ranks' contrastive rows differ, the number of optimizer steps and the logged losses.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from datasets import Dataset

from craft.config import CRAFTSFTConfig
from craft.data import CRAFTCollator, make_craft_datasets
from craft.testing import make_tokenizer, tiny_model
from craft.trainers import CRAFTSFTTrainer
from craft.testing import toy_chat_rows as _chat_rows, toy_pair_rows as _pair_rows



MODES = {
    "paired_gradcache": dict(strategy="paired_dataset", craft_use_gradcache=True, craft_gradcache_chunk_size=2,
                             craft_negative_strategy="queue", craft_negative_queue_size=16,
                             craft_learnable_temperature=True, craft_beta=0.5),
    "self_align": dict(strategy="self_align"),
    "self_align_pcgrad": dict(strategy="self_align", craft_gradient_balancing="pcgrad"),
}


def run(mode: str, out: str) -> dict:
    settings = dict(MODES[mode])
    strategy = settings.pop("strategy")
    sft = Dataset.from_list(_chat_rows(32, seed=1))  # 16 rows a rank: the 6 micro-batches stay in one epoch
    contrastive = Dataset.from_list(_pair_rows(16, seed=2)) if strategy == "paired_dataset" else None
    bundle = make_craft_datasets(sft, contrastive_dataset=contrastive, strategy=strategy)
    args = CRAFTSFTConfig(output_dir=os.path.join(out, mode), per_device_train_batch_size=2,
                          gradient_accumulation_steps=2, max_steps=3, use_cpu=True, report_to=[], bf16=False,
                          learning_rate=1e-2, logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True,
                          craft_projection_dim=16, craft_temperature=0.1, ddp_backend="gloo",
                          **{"craft_beta": 0.5, **settings})
    trainer = CRAFTSFTTrainer(model=tiny_model("llama"), args=args, train_dataset=sft, craft_bundle=bundle,
                              data_collator=CRAFTCollator(pad_token_id=3), processing_class=make_tokenizer())
    rows = []
    original = trainer.compute_loss

    def recording_compute_loss(model, inputs, *a, **k):
        if inputs.get("craft_batch_type") == "craft" or strategy == "self_align":
            rows.extend(map(tuple, inputs["input_ids"].tolist()))
        return original(model, inputs, *a, **k)

    trainer.compute_loss = recording_compute_loss
    trainer.train()
    params = [p.detach().reshape(-1) for p in trainer._craft_trainable_parameters()]
    flat = torch.cat(params)
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    all_rows = [None] * dist.get_world_size()
    dist.all_gather_object(all_rows, sorted(rows))
    queue = trainer.craft_queue.ordered() if trainer.craft_queue is not None else torch.zeros(0)
    queues = [torch.zeros_like(queue) for _ in range(dist.get_world_size())]
    dist.all_gather(queues, queue.contiguous())
    losses = [entry["loss/craft_contrast"] for entry in trainer.state.log_history if "loss/craft_contrast" in entry]
    return {"max_param_diff": float((gathered[0] - gathered[1]).abs().max()),
            "param_norm": float(flat.norm()),
            "rows_per_rank": [len(r) for r in all_rows],
            "shards_differ": set(all_rows[0]) != set(all_rows[1]),
            "shards_overlap": len(set(all_rows[0]) & set(all_rows[1])),
            "global_step": trainer.state.global_step,
            "contrastive_losses": losses,
            "queue_length": len(trainer.craft_queue) if trainer.craft_queue is not None else None,
            "queues_identical": torch.equal(queues[0], queues[1])}


def main() -> None:
    out = sys.argv[1]
    results = {mode: run(mode, out) for mode in MODES}
    if dist.get_rank() == 0:
        with open(os.path.join(out, "result.json"), "w") as handle:
            json.dump(results, handle)
    from craft.shutdown import end_launched_process

    end_launched_process(0)  # barrier, destroy, and no Python finalization racing the engines' gloo threads


if __name__ == "__main__":
    main()
