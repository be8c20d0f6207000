"""CRAFT fine-tuning launched by accelerate on any engine: DDP, DeepSpeed ZeRO-2 / ZeRO-3, FSDP2.

    accelerate launch --config_file examples/accelerate/zero3.yaml examples/accelerate/train_craft.py \
        --model PATH_TO_LOCAL_MODEL --output_dir out/craft-zero3

The engine comes from the accelerate config (docs/craft_scale.md, "Which engine"); this script is the same for all
of them. `--model` is a local directory (or a hub name, if the hub is reachable); without it the script builds a
tiny random Llama and tokenizer locally (`craft.testing`), so a launch can be tried on any machine, CPU included:

    accelerate launch --config_file examples/accelerate/ddp.yaml --cpu --num_processes 2 \
        examples/accelerate/train_craft.py --max_steps 2

Data: `--sft` and `--pairs` are .jsonl files of tokenized rows (`input_ids`, `labels` for SFT; `input_ids`,
`input_ids_tgt` for contrastive pairs); without them, toy rows. `--lora` trains a LoRA (PEFT) instead of every
weight.
"""

from __future__ import annotations

import argparse

import torch
from datasets import Dataset, load_dataset

from craft.config import CRAFTSFTConfig
from craft.data import CRAFTCollator, make_craft_datasets
from craft.trainers import CRAFTSFTTrainer


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="local model directory (default: a tiny random Llama)")
    parser.add_argument("--sft", default=None, help=".jsonl of tokenized SFT rows (default: toy rows)")
    parser.add_argument("--pairs", default=None, help=".jsonl of tokenized pairs (default: toy pairs)")
    parser.add_argument("--output_dir", default="out/craft-accelerate")
    parser.add_argument("--lora", action="store_true", help="train a LoRA instead of every weight")
    parser.add_argument("--max_steps", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=2, help="per device")
    parser.add_argument("--learning_rate", type=float, default=2e-5)
    return parser.parse_args()


def model_and_tokenizer(path: str | None):
    if path is None:
        from craft.testing import make_tokenizer, tiny_model

        return tiny_model("llama"), make_tokenizer()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def rows(path: str | None, toy, n: int) -> Dataset:
    if path is None:
        return Dataset.from_list(toy(n, seed=1))
    return load_dataset("json", data_files=path, split="train")


def main() -> None:
    options = parse_args()
    from craft.testing import toy_chat_rows, toy_pair_rows

    sft = rows(options.sft, toy_chat_rows, 64)
    pairs = rows(options.pairs, toy_pair_rows, 64)
    # The config first: under ZeRO-3 transformers then builds the model partitioned (deepspeed.zero.Init).
    args = CRAFTSFTConfig(output_dir=options.output_dir, per_device_train_batch_size=options.batch_size,
                          gradient_accumulation_steps=2, max_steps=options.max_steps,
                          learning_rate=options.learning_rate, logging_steps=1, save_strategy="no", report_to=[],
                          craft_alpha=0.6, craft_beta=0.5, craft_learnable_temperature=True,
                          dataloader_drop_last=True, bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    model, tokenizer = model_and_tokenizer(options.model)
    if options.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    trainer = CRAFTSFTTrainer(model=model, args=args, train_dataset=sft, processing_class=tokenizer,
                              craft_bundle=make_craft_datasets(sft, contrastive_dataset=pairs),
                              data_collator=CRAFTCollator(pad_token_id=pad))
    trainer.train()
    trainer.save_model()  # the plain HF model and craft_state.pt (projection head, temperature, queue)


if __name__ == "__main__":
    main()
