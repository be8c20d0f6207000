"""Shared by the CRAFT-at-scale tests: toy datasets and a tiny CRAFTSFTTrainer, built offline and seeded."""

from __future__ import annotations

import torch
from datasets import Dataset

from craft.config import CRAFTSFTConfig
from craft.data import CRAFTCollator, make_craft_datasets
from craft.testing import make_tokenizer, tiny_model
from craft.trainers import CRAFTSFTTrainer
from craft.testing import toy_chat_rows as chat_rows, toy_pair_rows as pair_rows  # noqa: F401 (re-exported)

COLLATE = CRAFTCollator(pad_token_id=3)


def craft_trainer(output_dir, strategy: str = "paired_dataset", model=None, contrastive_rows=None, **config):
    """A CRAFTSFTTrainer on a tiny Llama with 8 SFT rows and 8 contrastive pairs (or self-align rows)."""
    sft = Dataset.from_list(chat_rows(8, seed=1))
    if contrastive_rows is None and strategy == "paired_dataset":
        contrastive_rows = pair_rows(8, seed=2)
    contrastive = Dataset.from_list(contrastive_rows) if contrastive_rows is not None else None
    bundle = make_craft_datasets(sft, contrastive_dataset=contrastive, strategy=strategy,
                                 contrastive_keys=config.get("craft_contrastive_keys"))
    settings = dict(output_dir=str(output_dir), per_device_train_batch_size=2, use_cpu=True, report_to=[],
                    bf16=False, learning_rate=1e-2, logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True,
                    craft_projection_dim=16, craft_temperature=0.1, craft_beta=0.5, max_grad_norm=0.0)
    settings.update(config)
    return CRAFTSFTTrainer(model=model if model is not None else tiny_model("llama"), args=CRAFTSFTConfig(**settings),
                           train_dataset=sft, craft_bundle=bundle, data_collator=COLLATE,
                           processing_class=make_tokenizer())


def window(kinds: list[str], seed: int = 11) -> list[dict]:
    """Collated micro-batches of 2 rows, tagged "sft" or "contrastive" in the order given."""
    sft, pairs = chat_rows(16, seed), pair_rows(16, seed + 1)
    batches = []
    for k, kind in enumerate(kinds):
        rows = pairs if kind == "contrastive" else sft
        batch = COLLATE(rows[2 * k:2 * k + 2])
        batch["craft_batch_type"] = kind
        batches.append(batch)
    return batches


def trainable(trainer) -> list[torch.Tensor]:
    return trainer._craft_trainable_parameters()


def step_gradients(trainer, batches) -> list[torch.Tensor]:
    """The real path for one window: get_batch_samples, then training_step per micro-batch; the gradients."""
    trainer.model.zero_grad(set_to_none=True)
    micro_batches, num_items = trainer.get_batch_samples(iter(batches), len(batches), trainer.args.device)
    trainer.current_gradient_accumulation_steps = len(micro_batches)
    for batch in micro_batches:
        trainer.training_step(trainer.model, batch, num_items)
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in trainable(trainer)]


MULTIPROCESS_ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    "TRANSFORMERS_VERBOSITY": "error", "DS_ACCELERATOR": "cpu"}


def free_port() -> int:
    """A TCP port nobody listens on now: other test runs may hold any fixed one."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_processes(*worker_args, timeout: int = 900):
    """`torchrun --nproc_per_node 2 WORKER ARGS...` on a free port, CPU settings (gloo; DeepSpeed's CPU accelerator)."""
    import os
    import subprocess
    import sys

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), *map(str, worker_args)]
    return subprocess.run(command, env={**os.environ, **MULTIPROCESS_ENV}, capture_output=True, text=True,
                          timeout=timeout)
