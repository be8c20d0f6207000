"""`make demo-craft` (`python -m craft.demo_craft`): does CRAFT help, and what does alpha cost? Offline, ~2 min.

The task (bundled, `examples/demo/data/craft_pairs/*.jsonl`, written by `scripts/make_demo_corpus.py`): one short plot
(who, where, what was found, what happened) told twice, plainly and by a pirate; every text is cut to its first
64 tokens. The SFT text of a pair is its pirate story (a style fine-tune); the contrastive pair is (plain story,
pirate story): the same plot in two registers. The base model is the small Llama of `make demo`
(`examples/demo/base_model`, pretrained on such stories).

Every run starts from the same base model and seed and takes the same optimizer steps over the same SFT
micro-batches (the same SFT tokens, in the same order; the table counts them):

* plain SFT — `CRAFTSFTTrainer` with craft_alpha=1, craft_beta=1: SFT micro-batches only, one per step, exactly
  the token-mean NLL (what `trl.SFTTrainer` optimises);
* CRAFT at each alpha of the sweep — gradient_accumulation_steps=2, craft_beta=0.5: each step is the same SFT
  micro-batch as plain SFT's step plus one contrastive micro-batch (8 pairs, in-batch negatives, mean pooling,
  temperature 0.05), and follows grad[alpha·L_sft + (1 - alpha)·L_con].

Held out (pairs never trained on):
* retrieval@1 — each plain story's pooled representation (mean of the final-norm hidden states over its tokens,
  the pooling CRAFT trains, before the projection head) must be closer (cosine) to its own pirate story's than to
  every other held-out pirate story's; chance is 1/N;
* LM loss — token-mean NLL of the held-out pirate stories (the SFT task), and its change against plain SFT.

docs/craft_demo.md has the table, the recommended alpha and the trade-off.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "demo"
ALPHAS = (0.9, 0.8, 0.6)
STEPS = 60
BATCH = 8
MAX_TOKENS = 64  # the plot's who / where / what / event fit; the cost halves


@dataclass
class Setup:
    """One demo configuration (the defaults are `make demo-craft`; tests use a tiny one)."""

    steps: int = STEPS
    alphas: tuple[float, ...] = ALPHAS
    train_rows: int | None = None  # None: all 256 bundled training pairs
    heldout_rows: int | None = None  # None: all 64 held-out pairs
    batch: int = BATCH
    learning_rate: float = 1e-3
    pooling: str = "mean"  # last_token learns retrieval far slower here (0.094 after 60 steps at alpha 0.9)
    temperature: float = 0.05
    seed: int = 0


@dataclass
class Result:
    """A table row: held-out numbers of one model, and what its training saw."""

    run: str
    alpha: float | None
    retrieval: float
    lm_loss: float
    steps: int = 0
    sft_tokens: int = 0
    sft_digest: list[str] = field(default_factory=list)  # one hash per SFT micro-batch, in training order
    seconds: float = 0.0


def load_pairs(split: str, rows: int | None = None) -> list[dict]:
    with open(DEMO / "data" / "craft_pairs" / f"{split}.jsonl") as f:
        pairs = [json.loads(line) for line in f]
    return pairs if rows is None else pairs[:rows]


def sft_text(pair: dict) -> str:
    return pair["pirate"]


def _tokens(tokenizer, texts: list[str]):
    return tokenizer(texts, truncation=True, max_length=MAX_TOKENS)


def _datasets(tokenizer, pairs: list[dict]):
    """(SFT dataset of the pirate stories, paired dataset plain -> pirate)."""
    from datasets import Dataset

    sft = _tokens(tokenizer, [sft_text(p) for p in pairs])
    plain, pirate = _tokens(tokenizer, [p["plain"] for p in pairs]), _tokens(tokenizer, [p["pirate"] for p in pairs])
    sft_dataset = Dataset.from_dict({"input_ids": sft["input_ids"], "labels": sft["input_ids"]})
    contrastive = Dataset.from_dict({"input_ids": plain["input_ids"], "input_ids_tgt": pirate["input_ids"]})
    return sft_dataset, contrastive


def _counting_trainer_class():
    """`CRAFTSFTTrainer` that records every SFT micro-batch it trains (token count, content hash): the proof that
    all runs saw the same SFT tokens in the same order."""
    from craft.accumulator import SFT, batch_type
    from craft.trainers import CRAFTSFTTrainer

    class CountingTrainer(CRAFTSFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            if batch_type(inputs) == SFT:
                ids = inputs["input_ids"][inputs["labels"] != -100]
                self.demo_sft_tokens = getattr(self, "demo_sft_tokens", 0) + int(ids.numel())
                digest = hashlib.sha1(inputs["input_ids"].cpu().numpy().tobytes()).hexdigest()[:12]
                self.demo_sft_digest = [*getattr(self, "demo_sft_digest", []), digest]
            return super().training_step(model, inputs, num_items_in_batch)

    return CountingTrainer


def train(alpha: float | None, setup: Setup):
    """Train from the base model: plain SFT when ``alpha`` is None, else CRAFT at ``alpha``.
    Returns (model in eval mode, tokenizer, trainer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from craft.config import CRAFTSFTConfig
    from craft.data import CRAFTCollator, make_craft_datasets

    tokenizer = AutoTokenizer.from_pretrained(DEMO / "base_model")
    sft, contrastive = _datasets(tokenizer, load_pairs("train", setup.train_rows))
    bundle = make_craft_datasets(sft, contrastive_dataset=contrastive, strategy="paired_dataset")
    torch.manual_seed(setup.seed)
    model = AutoModelForCausalLM.from_pretrained(DEMO / "base_model", dtype=torch.float32)
    plain = alpha is None
    with tempfile.TemporaryDirectory() as scratch:
        args = CRAFTSFTConfig(
            output_dir=scratch, per_device_train_batch_size=setup.batch,
            gradient_accumulation_steps=1 if plain else 2, max_steps=setup.steps, max_length=MAX_TOKENS,
            learning_rate=setup.learning_rate, lr_scheduler_type="constant", warmup_steps=0,
            logging_steps=setup.steps, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
            disable_tqdm=True, seed=setup.seed,
            craft_alpha=1.0 if plain else alpha, craft_beta=1.0 if plain else 0.5, craft_projection_dim=64,
            craft_temperature=setup.temperature, craft_pooling=setup.pooling,
        )
        trainer = _counting_trainer_class()(model=model, args=args, train_dataset=sft, craft_bundle=bundle,
                                            data_collator=CRAFTCollator(pad_token_id=tokenizer.pad_token_id),
                                            processing_class=tokenizer)
        trainer.train()
    return trainer.model.eval(), tokenizer, trainer


def evaluate(model, tokenizer, pairs: list[dict], pooling: str = "mean") -> dict[str, float]:
    """Held-out retrieval@1 plain -> pirate (cosine of the pooled final-norm states) and LM loss."""
    import torch
    import torch.nn.functional as F

    from craft.hooks import LastHiddenStateCapture
    from craft.losses import pool_hidden_states

    def batch_of(texts):
        return tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=MAX_TOKENS)

    def embed(texts):
        batch = batch_of(texts)
        with torch.no_grad(), LastHiddenStateCapture(model) as capture:
            model(**batch)
        return F.normalize(pool_hidden_states(capture.hidden, batch["attention_mask"], pooling), dim=-1)

    anchors, positives = embed([p["plain"] for p in pairs]), embed([p["pirate"] for p in pairs])
    retrieval = float(((anchors @ positives.T).argmax(dim=1) == torch.arange(len(pairs))).float().mean())
    batch = batch_of([sft_text(p) for p in pairs])
    with torch.no_grad():
        logits = model(**batch).logits[:, :-1]
    targets = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
    lm_loss = float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100))
    return {"retrieval": retrieval, "lm_loss": lm_loss}


def run(setup: Setup = Setup(), progress=None) -> list[Result]:
    """Base model, plain SFT, then CRAFT at each alpha: one `Result` each."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    heldout = load_pairs("heldout", setup.heldout_rows)
    tokenizer = AutoTokenizer.from_pretrained(DEMO / "base_model")
    base = AutoModelForCausalLM.from_pretrained(DEMO / "base_model").eval()
    results = [Result("base model", None, **evaluate(base, tokenizer, heldout, setup.pooling))]
    for alpha in (None, *setup.alphas):
        start = time.perf_counter()
        model, tokenizer, trainer = train(alpha, setup)
        name, weight = ("plain SFT", 1.0) if alpha is None else ("CRAFT", alpha)
        results.append(Result(name, weight, **evaluate(model, tokenizer, heldout, setup.pooling),
                              steps=trainer.state.global_step, sft_tokens=trainer.demo_sft_tokens,
                              sft_digest=trainer.demo_sft_digest, seconds=time.perf_counter() - start))
        if progress is not None:
            progress(results[-1])
    return results


def format_table(results: list[Result]) -> str:
    """The results as a Markdown table; LM loss also relative to plain SFT's."""
    sft = next((r.lm_loss for r in results if r.run == "plain SFT"), None)
    lines = ["| run | alpha | optimizer steps | SFT tokens | held-out retrieval@1 | held-out LM loss | "
             "LM loss vs plain SFT |", "|---|---|---|---|---|---|---|"]
    for r in results:
        alpha = "-" if r.alpha is None else f"{r.alpha:g}"
        trained = ("-", "-") if r.run == "base model" else (str(r.steps), str(r.sft_tokens))
        relative = "-" if sft is None or r.run == "base model" else f"{100 * (r.lm_loss / sft - 1):+.1f} %"
        lines.append(f"| {r.run} | {alpha} | {trained[0]} | {trained[1]} | {r.retrieval:.3f} | {r.lm_loss:.3f} | "
                     f"{relative} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m craft.demo_craft", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS))
    parser.add_argument("--pooling", default=Setup.pooling, choices=("mean", "last_token", "weighted_mean"),
                        help="craft_pooling, also the held-out representation (default: %(default)s)")
    options = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets
    import torch
    from transformers.utils import logging

    # One thread: the matrices are tiny (8 x 64 tokens, width 128), so a second thread only adds synchronisation,
    # and on a busy machine its spin-waits cost several times the work (same numbers either way).
    torch.set_num_threads(1)

    logging.set_verbosity_error()
    datasets.disable_progress_bars()
    setup = Setup(steps=options.steps, alphas=tuple(options.alphas), pooling=options.pooling)
    print(f"CRAFT vs plain SFT: {setup.steps} optimizer steps of {setup.batch} SFT rows each in every run (CRAFT adds "
          f"one contrastive micro-batch of {setup.batch} pairs to each step); {setup.pooling} pooling; "
          f"{len(load_pairs('heldout'))} held-out pairs, chance retrieval 1/64", flush=True)
    results = run(setup, progress=lambda r: print(f"  trained {r.run} alpha={r.alpha} in {r.seconds:.1f} s",
                                                  flush=True))
    print(format_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
