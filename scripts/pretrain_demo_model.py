"""Pretrain the small base model that `make demo` steers, on the bundled corpus.

    python scripts/make_demo_corpus.py && python scripts/pretrain_demo_model.py   # ~5 min on 2 CPU cores

Writes `examples/demo/base_model/` (a Llama-architecture HF directory: config, safetensors, tokenizer). The
model sees all three registers (pirate, formal, neutral) in equal parts, so it can write each of them but has no
preference: at the start of a story it does not know which register comes. That is the gap a Control Adapter
closes — +1 should pull it towards one register, −1 towards the other.

The loop is deliberately plain (AdamW, cosine LR, random packed windows); seeds are fixed, so a re-run on the
same torch build writes the same weights.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from craft.testing import train_bpe_tokenizer

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "demo" / "data"
STYLES = ("pirate", "formal", "neutral")


def read_texts(split: str) -> list[str]:
    texts = []
    for style in STYLES:
        with open(DATA / f"{style}_{split}.jsonl") as f:
            texts += [json.loads(line)["text"] for line in f]
    return texts


def packed_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All documents as one token stream: <s> doc </s> <s> doc </s> ..."""
    ids = []
    for text in texts:
        ids += [tokenizer.bos_token_id] + tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    return torch.tensor(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "examples" / "demo" / "base_model")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    texts = read_texts("pretrain")
    tokenizer = train_bpe_tokenizer(texts, vocab_size=512)
    stream = packed_stream(tokenizer, texts)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01)
    schedule = lambda step: min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    print(f"{n_params / 1e6:.2f}M parameters, {len(stream)} tokens, {args.steps} steps")

    model.train()
    start = time.time()
    for step in range(args.steps):
        starts = torch.randint(0, len(stream) - args.seq - 1, (args.batch,))
        batch = torch.stack([stream[s:s + args.seq] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.steps - 1:
            rate = (step + 1) * args.batch * args.seq / (time.time() - start)
            print(f"step {step:4d}  loss {loss.item():.3f}  {rate:,.0f} tok/s")

    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
