"""`make demo`: steer a small model between two writing styles with a Control Adapter, and show that it works.

    python -m craft.demo [--out runs/demo]

1. `craft train examples/demo.toml` trains a Control Adapter on the bundled base model
   (`examples/demo/base_model`, pretrained by `scripts/pretrain_demo_model.py` on pirate, formal and neutral
   stories in equal parts): class +1 on pirate stories, class −1 (the inverse transform) on formal ones,
   class 0 on neutral ones.
2. `craft convert` turns the adapter into two standard PEFT LoRAs, one per direction.
3. A table of held-out loss (nats per token) for each style under the base model, the adapter at +1 and at −1,
   and the converted LoRAs loaded with `PeftModel.from_pretrained` — +1 should lower the pirate loss, −1 the
   formal loss, and each LoRA should match its direction of the adapter.
4. A few sampled story openings under base, +1 and −1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "demo"
STYLES = ("pirate", "formal", "neutral")
OPENING_TOKENS = 12


def craft_command(*args: str) -> None:
    """Run a `craft` subcommand exactly as a user would, echoing the command."""
    command = [sys.executable, "-m", "craft", *args]
    print("$ craft " + " ".join(args), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def newest_epoch_dir(output_dir: Path) -> Path:
    epochs = sorted(output_dir.glob("*/epoch*"), key=lambda p: (p.stat().st_mtime, p.name))
    if not epochs:
        raise SystemExit(f"no epoch output under {output_dir}: did training fail?")
    return epochs[-1]


def heldout_texts(style: str) -> list[str]:
    with open(DEMO / "data" / f"{style}_heldout.jsonl") as f:
        return [json.loads(line)["text"] for line in f]


@torch.no_grad()
def mean_loss(model, tokenizer, texts: list[str], first_tokens: int | None = None) -> float:
    """Token-mean next-token NLL over the documents, each framed as <s> text </s> like the pretraining data;
    with `first_tokens`, only over each document's first that many tokens (where the register is decided)."""
    total, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]])
        if first_tokens is not None:
            ids = ids[:, : first_tokens + 1]
        total += model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    return total / count


@torch.no_grad()
def samples(model, tokenizer, n: int, seed: int = 0) -> list[str]:
    torch.manual_seed(seed)
    start = torch.tensor([[tokenizer.bos_token_id]] * n)
    out = model.generate(start, max_new_tokens=32, do_sample=True, temperature=0.8, top_k=0,
                         pad_token_id=tokenizer.pad_token_id)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in out]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "demo")
    args = parser.parse_args(argv)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from craft.adapters import control_class, load_control_adapter

    craft_command("train", "examples/demo.toml", "--set", f"output_dir={json.dumps(str(args.out))}")
    adapter_dir = newest_epoch_dir(args.out)
    lora_dirs = {direction: args.out / f"lora_{name}" for direction, name in ((1, "plus"), (-1, "minus"))}
    for direction, lora_dir in lora_dirs.items():
        craft_command("convert", str(adapter_dir), str(lora_dir), "--direction", str(direction), "--force")

    tokenizer = AutoTokenizer.from_pretrained(DEMO / "base_model")
    load_base = lambda: AutoModelForCausalLM.from_pretrained(DEMO / "base_model").eval()  # noqa: E731
    base = load_base()
    texts = {style: heldout_texts(style) for style in STYLES}
    steered = load_control_adapter(load_base(), adapter_dir).eval()
    loras = {d: PeftModel.from_pretrained(load_base(), str(lora_dirs[d])).eval() for d in lora_dirs}
    variants = [("base model", base, None), ("adapter +1", steered, 1), ("adapter -1", steered, -1),
                ("LoRA +1 (PEFT)", loras[1], None), ("LoRA -1 (PEFT)", loras[-1], None)]

    def table(first_tokens):
        rows = {}
        for label, model, direction in variants:
            with control_class(steered, direction) if direction else contextlib.nullcontext():
                rows[label] = {s: mean_loss(model, tokenizer, texts[s], first_tokens) for s in STYLES}
        return rows

    results = {}
    for title, first_tokens in (("whole story", None), (f"opening ({OPENING_TOKENS} tokens)", OPENING_TOKENS)):
        rows = results[title] = table(first_tokens)
        print(f"\nHeld-out loss, {title} (nats/token; lower = the model finds that style more likely)\n")
        print(f"{'':18}" + "".join(f"{s:>10}" for s in STYLES))
        for label, losses in rows.items():
            print(f"{label:18}" + "".join(f"{losses[s]:10.3f}" for s in STYLES))
    rows = results[f"opening ({OPENING_TOKENS} tokens)"]
    pirate_gain = rows["base model"]["pirate"] - rows["adapter +1"]["pirate"]
    formal_gain = rows["base model"]["formal"] - rows["adapter -1"]["formal"]
    print(f"\nOn story openings, +1 lowers the pirate loss by {pirate_gain:.3f} nats/token and -1 lowers the "
          f"formal loss by {formal_gain:.3f}.")

    print("\nSampled story openings (same seed for each row)")
    for label, model, direction in (("base", base, None), ("+1", steered, 1), ("-1", steered, -1)):
        with control_class(steered, direction) if direction else contextlib.nullcontext():
            texts_out = samples(model, tokenizer, 3)
        for text in texts_out:
            print(f"  [{label:>4}] {text}")
    steering_works = pirate_gain > 0 and formal_gain > 0
    print("\nsteering works both ways" if steering_works else "\nWARNING: the steering effect did not show")
    return 0 if steering_works else 1


if __name__ == "__main__":
    sys.exit(main())
