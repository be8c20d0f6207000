"""CRAFT training overhead against plain `trl.SFTTrainer`, and hook vs `output_hidden_states=True` memory.

    .venv/bin/python bench/craft_overhead.py                       # defaults: 4 layers, hidden 256, seq 64-128
    .venv/bin/python bench/craft_overhead.py --rounds 20 --batch 8  # longer / bigger

Step time. Three trainers on the same tiny random Llama (``--layers``, ``--hidden``; same weights) and the same
SFT rows (prompt third masked with -100), batch ``--batch``, two micro-batches per optimizer step:
  * plain   — `trl.SFTTrainer`;
  * self-align — `CRAFTSFTTrainer`, strategy "self_align": every micro-batch gives the SFT loss and the InfoNCE
    term from its one forward;
  * paired  — `CRAFTSFTTrainer`, strategy "paired_dataset", beta 0.5: one SFT and one contrastive micro-batch
    (anchors + positives, one forward) per step.
One optimizer step = the trainer's own `get_batch_samples`, `training_step` per micro-batch, `optimizer.step`,
`zero_grad`. The variants are timed round-robin (one step each per round, ``--rounds`` rounds after two warm-up
rounds) and the median step time of each is compared: ratios are taken within one run on one machine. The
ratio uses the process's CPU time per step with ``--threads`` torch threads (1 by default), which other load
on a shared machine does not inflate; the wall-clock medians are printed too.

Memory. On an 8-layer model (``--memory-layers``): one paired contrastive training step (forward + backward of
2 x ``--memory-batch`` sequences of ``--max-len`` tokens) and one no-grad embedding forward of the same
sequences, with the final-norm hook and with ``output_hidden_states=True``. The number is the peak of the bytes
held by torch's CPU allocator during the region above what it held before (torch profiler memory events), so
it does not depend on what glibc keeps resident.

Claims: self-align / plain <= 1.15; paired / plain is reported; hook / output_hidden_states peak memory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from common import allocated_peak_bytes, machine, report  # noqa: E402

VOCAB = 384


def _rows(num_rows: int, min_len: int, max_len: int, seed: int, pairs: bool = False) -> list[dict]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(num_rows):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=gen))
        ids = torch.randint(4, VOCAB, (length,), generator=gen).tolist()
        if pairs:
            tgt = torch.randint(4, VOCAB, (length,), generator=gen).tolist()
            rows.append({"input_ids": ids, "input_ids_tgt": tgt})
        else:
            prompt = length // 3
            rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def _config(cls, args, **extra):
    common = dict(output_dir="/tmp/craft_overhead", per_device_train_batch_size=args.batch,
                  gradient_accumulation_steps=2, use_cpu=True, bf16=False, report_to=[], save_strategy="no",
                  gradient_checkpointing=False, learning_rate=1e-4, seed=0, disable_tqdm=True)
    return cls(**common, **extra)


def _trainers(args):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from craft.config import CRAFTSFTConfig
    from craft.data import CRAFTCollator, make_craft_datasets
    from craft.testing import make_tokenizer, tiny_model
    from craft.trainers import CRAFTSFTTrainer

    sft = Dataset.from_list(_rows(64, args.min_len, args.max_len, seed=1))
    pairs = Dataset.from_list(_rows(64, args.min_len, args.max_len, seed=2, pairs=True))
    collator = CRAFTCollator(pad_token_id=3)

    def model():
        return tiny_model("llama", hidden_size=args.hidden, num_layers=args.layers)

    tokenizer = make_tokenizer()
    plain = SFTTrainer(model=model(), args=_config(SFTConfig, args), train_dataset=sft, data_collator=collator,
                       processing_class=tokenizer)
    self_align = CRAFTSFTTrainer(model=model(), args=_config(CRAFTSFTConfig, args), train_dataset=sft,
                                 craft_bundle=make_craft_datasets(sft, strategy="self_align"),
                                 data_collator=collator, processing_class=tokenizer)
    paired = CRAFTSFTTrainer(model=model(), args=_config(CRAFTSFTConfig, args, craft_beta=0.5), train_dataset=sft,
                             craft_bundle=make_craft_datasets(sft, pairs, strategy="paired_dataset"),
                             data_collator=collator, processing_class=tokenizer)
    return {"plain": plain, "self-align": self_align, "paired": paired}


def _step_function(trainer):
    """One optimizer step through the trainer's own window fetch and training_step."""
    import itertools

    trainer.create_optimizer()
    trainer.model.train()
    batches = itertools.cycle(list(trainer.get_train_dataloader()))
    device = trainer.args.device

    def step():
        window, num_items = trainer.get_batch_samples(batches, 2, device)
        trainer.current_gradient_accumulation_steps = len(window)
        for batch in window:
            trainer.training_step(trainer.model, batch, num_items)
        trainer.optimizer.step()
        trainer.model.zero_grad()

    return step


def measure_step_times(args) -> dict[str, dict[str, float]]:
    """Median CPU seconds (process time) and wall seconds per optimizer step of each variant."""
    steps = {name: _step_function(trainer) for name, trainer in _trainers(args).items()}
    cpu = {name: [] for name in steps}
    wall = {name: [] for name in steps}
    for round_index in range(args.rounds + 2):
        for name, step in steps.items():
            cpu_start, wall_start = time.process_time(), time.perf_counter()
            step()
            if round_index >= 2:  # two warm-up rounds
                cpu[name].append(time.process_time() - cpu_start)
                wall[name].append(time.perf_counter() - wall_start)
    return {name: {"cpu": statistics.median(cpu[name]), "wall": statistics.median(wall[name])} for name in steps}


# ------------------------------------------------------------------------------------------------ memory


def measure_memory(args) -> dict[str, dict[str, int]]:
    """Peak allocated bytes of a paired contrastive train step and of a no-grad embedding forward, per capture."""
    import torch

    from craft.config import CRAFTSFTConfig
    from craft.data import CRAFTCollator
    from craft.testing import tiny_model
    from craft.encoding import BackboneHiddenStates, FinalNormHook
    from craft.objective import ContrastiveObjective

    torch.manual_seed(0)
    model = tiny_model("llama", hidden_size=args.hidden, num_layers=args.memory_layers).train()
    config = CRAFTSFTConfig(output_dir="/tmp/craft_overhead", use_cpu=True, report_to=[])
    modules = ContrastiveObjective.from_config(args.hidden, config)
    batch = CRAFTCollator(pad_token_id=3)(_rows(2 * args.memory_batch, args.max_len, args.max_len, seed=3))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    out = {}
    for mode in ("hook", "output_hidden_states"):
        def embed():
            capture = FinalNormHook(model) if mode == "hook" else BackboneHiddenStates(model)
            with capture:
                model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1,
                      **capture.forward_kwargs)
            return modules.project(modules.pool(capture.hidden, mask))

        def train_step():
            emb = embed()
            half = emb.shape[0] // 2
            modules.infonce(emb[:half], emb[half:]).backward()
            model.zero_grad(set_to_none=True)
            modules.zero_grad(set_to_none=True)

        def inference():
            with torch.no_grad():
                embed()

        train_step()  # warm-up (lazy initialisation)
        out[mode] = {"train": allocated_peak_bytes(train_step), "no_grad": allocated_peak_bytes(inference)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--min-len", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory-batch", type=int, default=16)
    parser.add_argument("--memory-layers", type=int, default=8)
    args = parser.parse_args()

    import datasets
    import torch
    from transformers.utils import logging

    logging.set_verbosity_error()
    datasets.disable_progress_bars()
    print(f"machine: {machine()}; llama {args.layers} layers, hidden {args.hidden}, batch {args.batch}, "
          f"seq {args.min_len}-{args.max_len}, GA 2")
    torch.set_num_threads(args.threads)
    times = measure_step_times(args)
    for name, t in times.items():
        print(f"  {name:>10}: {t['cpu'] * 1000:8.1f} ms CPU, {t['wall'] * 1000:8.1f} ms wall / optimizer step "
              f"(medians of {args.rounds})")
    plain = times["plain"]["cpu"]
    for name, what, goal in (("self-align", "CRAFT self-align step time / plain SFTTrainer", "<= 1.15"),
                             ("paired", "CRAFT paired (beta 0.5) step time / plain SFTTrainer", "")):
        report(what, times[name]["cpu"] / plain, goal,
               f"CPU time per optimizer step, {args.threads} thread(s): {times[name]['cpu'] * 1000:.0f} ms vs "
               f"{plain * 1000:.0f} ms")

    memory = measure_memory(args)
    # Training saves every layer's output for backward whichever way it is captured, so there the hook can only
    # match output_hidden_states; without grad the tuple of all hidden states is what the hook saves.
    for region, goal in (("train", "<= 1"), ("no_grad", "< 1")):
        hook, full = memory["hook"][region], memory["output_hidden_states"][region]
        print(f"  {region:>8} peak allocated: hook {hook / 2**20:7.1f} MiB, output_hidden_states "
              f"{full / 2**20:7.1f} MiB")
        report(f"hook / output_hidden_states peak memory ({region}, {args.memory_layers} layers, "
               f"{2 * args.memory_batch} x {args.max_len} tokens)", hook / full, goal,
               f"{hook / 2**20:.1f} MiB vs {full / 2**20:.1f} MiB (torch CPU allocator peak)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
