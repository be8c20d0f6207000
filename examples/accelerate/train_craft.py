"""CRAFT fine-tuning launched by accelerate on any engine: DDP, DeepSpeed ZeRO-2 / ZeRO-3, FSDP2.

    accelerate launch --config_file examples/accelerate/zero3.yaml examples/accelerate/train_craft.py \
        --model PATH_TO_LOCAL_MODEL --output_dir out/craft-zero3

The engine comes from the accelerate config (docs/craft_scale.md, "Which engine"); this script is the same for all
of them. `--model` is a local directory (or a hub name, if the hub is reachable); without it the script builds a
tiny random Llama and tokenizer locally (`craft.testing`), so a launch can be tried on any machine, CPU included:

    DS_ACCELERATOR=cpu accelerate launch --config_file examples/accelerate/ddp.yaml --num_processes 2 \
        --mixed_precision no examples/accelerate/train_craft.py --max_steps 2

(not `--cpu`: accelerate then starts one plain process, whatever the config and `--num_processes` say; without a
GPU the script trains on the CPU by itself, gloo between the ranks; FSDP2 on CPU also needs
`--fsdp_state_dict_type SHARDED_STATE_DICT`). Rank 0 prints the engine and the number of processes first.

Data: `--sft` and `--pairs` are .jsonl files of tokenized rows (`input_ids`, `labels` for SFT; `input_ids`,
`input_ids_tgt` for contrastive pairs); without them, toy rows. `--lora` trains a LoRA (PEFT) instead of every
weight. `--craft KEY=VALUE` sets any `craft_*` field of CRAFTSFTConfig (a Python literal, else a string), e.g.
`--craft craft_use_gradcache=True --craft craft_gradcache_chunk_size=1`; `--save_steps N` writes checkpoints and
`--resume` continues from the last one in `--output_dir`. A mistake (an unknown key, a setting the engine cannot
run) ends in one line naming it, exit status 2.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import warnings

import torch
from datasets import Dataset, load_dataset

from craft.config import CRAFTSFTConfig
from craft.data import CRAFTCollator, make_craft_datasets
from craft.errors import UserError, report_error
from craft.trainers import CRAFTSFTTrainer

# DeepSpeed on CPU calls torch.distributed's deprecated collectives on every step: one FutureWarning per call,
# hundreds of lines in a ZeRO-3 run.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


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
    parser.add_argument("--craft", action="append", default=[], metavar="KEY=VALUE",
                        help="a craft_* setting of CRAFTSFTConfig (repeatable), e.g. craft_use_gradcache=True")
    parser.add_argument("--save_steps", type=int, default=0, help="write a checkpoint every N steps (0: none)")
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --output_dir")
    return parser.parse_args()


def mixed_precision() -> dict:
    """bf16 / fp16 as `accelerate launch` says (the config's ``mixed_precision`` or ``--mixed_precision``: the
    DeepSpeed json's "auto" values must agree with the Trainer's); without a launcher bf16 where the GPU has it."""
    mode = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if mode is None:
        mode = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return {"bf16": mode == "bf16", "fp16": mode == "fp16"}


def craft_settings(pairs: list[str]) -> dict:
    """``--craft KEY=VALUE`` options as keywords: VALUE a Python literal (1, 0.5, True, None), else a string."""
    settings = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.startswith("craft_"):
            raise UserError(f"--craft {pair!r}: expected craft_KEY=VALUE, e.g. craft_use_gradcache=True")
        try:
            settings[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            settings[key] = text
    return settings


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
    try:
        train(options)
        status = 0
    except UserError as err:  # one line, from rank 0 (every rank raises the same), named by the launcher's summary
        report_error(f"train_craft.py: error: {err}")
        status = UserError.exit_code
    if torch.distributed.is_initialized():
        from craft.shutdown import end_launched_process

        # gloo threads the engine keeps alive could abort a finished rank in Python's finalization (craft.shutdown)
        end_launched_process(status)
    sys.exit(status)


def train(options) -> None:
    from craft.testing import toy_chat_rows, toy_pair_rows

    sft = rows(options.sft, toy_chat_rows, 64)
    pairs = rows(options.pairs, toy_pair_rows, 64)
    from craft.engines import check_launch_environment

    check_launch_environment()  # the launcher's engine settings that would fail later with a long traceback
    # The config first: under ZeRO-3 transformers then builds the model partitioned (deepspeed.zero.Init).
    args = CRAFTSFTConfig(output_dir=options.output_dir, per_device_train_batch_size=options.batch_size,
                          gradient_accumulation_steps=2, max_steps=options.max_steps,
                          learning_rate=options.learning_rate, logging_steps=1, report_to=[],
                          save_strategy="steps" if options.save_steps else "no", save_steps=options.save_steps or 500,
                          dataloader_drop_last=True, use_cpu=not torch.cuda.is_available(),  # CPU: gloo ranks
                          **mixed_precision(),
                          **{"craft_alpha": 0.6, "craft_beta": 0.5, "craft_learnable_temperature": True,
                             **craft_settings(options.craft)})
    model, tokenizer = model_and_tokenizer(options.model)
    if options.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    trainer = CRAFTSFTTrainer(model=model, args=args, train_dataset=sft, processing_class=tokenizer,
                              craft_bundle=make_craft_datasets(sft, contrastive_dataset=pairs),
                              data_collator=CRAFTCollator(pad_token_id=pad))
    if trainer.args.process_index == 0:
        from craft.engines import engine_name

        print(f"train_craft.py: engine {engine_name(trainer)}, {trainer.args.world_size} process(es), "
              f"{trainer.args.device.type}", flush=True)
    trainer.train(resume_from_checkpoint=True if options.resume else None)
    trainer.save_model()  # the plain HF model and craft_state.pt (projection head, temperature, queue)
    for tracker in trainer.accelerator.trackers:  # end_training without its destroy_process_group
        tracker.finish()


if __name__ == "__main__":
    main()
