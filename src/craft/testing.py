"""Offline test support: tiny random causal LMs for every supported family and a locally trained tokenizer.

Nothing here touches a model hub. Every model is built from a `transformers` config with a fixed seed, so two
calls with the same arguments give bit-identical weights, and each can be saved as an ordinary local HF
directory (`config.json`, `model.safetensors`, tokenizer files) that `AutoModelForCausalLM.from_pretrained` and
`craft train` read like any downloaded checkpoint.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

FAMILIES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "phi3", "cohere", "cohere2", "gemma2")

# A small corpus with enough variety for a byte-level BPE to learn a few hundred merges.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "User: What is the capital of France? Assistant: The capital of France is Paris.",
    "User: Tell me a joke. Assistant: Why did the chicken cross the road? To get to the other side.",
    "Contrastive learning pulls matching pairs together and pushes other pairs apart.",
    "A control adapter multiplies the residual stream by the identity plus a low rank matrix.",
    "Arrr, the sea be calm today, matey, and the wind be fair for sailing.",
    "Dear Sir or Madam, I am writing to inform you of the schedule for the quarterly meeting.",
    "numbers 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`",
]

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def train_bpe_tokenizer(texts, vocab_size: int):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on `texts` (ids: unk 0, bos 1, eos 2, pad 3)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL_TOKENS[k] for k in ("unk_token", "bos_token", "eos_token", "pad_token")],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    tokenizer.padding_side = "right"
    return tokenizer


@functools.lru_cache(maxsize=4)
def _tiny_tokenizer_json(vocab_size: int) -> str:
    return train_bpe_tokenizer(_CORPUS * 4, vocab_size).backend_tokenizer.to_str()


def make_tokenizer(vocab_size: int = 384):
    """The test tokenizer: byte-level BPE trained on a tiny built-in corpus (ids: unk 0, bos 1, eos 2, pad 3)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json(vocab_size)),
                                        **SPECIAL_TOKENS)
    tokenizer.padding_side = "right"
    return tokenizer


def tiny_config(family: str, vocab_size: int = 384, hidden_size: int = 64, num_layers: int = 2, **overrides):
    """A transformers config for `family` with a few tens of thousands of parameters."""
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )
    per_family = {
        "llama": (transformers.LlamaConfig, {}),
        "mistral": (transformers.MistralConfig, {"sliding_window": None}),
        "mixtral": (transformers.MixtralConfig, {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None}),
        "qwen2": (transformers.Qwen2Config, {}),
        "qwen3": (transformers.Qwen3Config, {"head_dim": hidden_size // 4}),
        "phi3": (transformers.Phi3Config, {}),
        "cohere": (transformers.CohereConfig, {"logit_scale": 1.0}),
        "cohere2": (transformers.Cohere2Config, {"logit_scale": 1.0, "sliding_window": 16}),
        "gemma2": (transformers.Gemma2Config, {"head_dim": hidden_size // 4, "sliding_window": 16,
                                               "query_pre_attn_scalar": hidden_size // 4}),
    }
    config_class, extra = per_family[family]
    kwargs = {**common, **extra, **overrides}
    if family in ("cohere", "cohere2"):
        kwargs["tie_word_embeddings"] = overrides.get("tie_word_embeddings", True)  # Cohere ties by construction
    return config_class(**kwargs)


def tiny_model(family: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **config_overrides):
    """A randomly initialised causal LM of `family` (deterministic for a given seed), in eval mode."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **config_overrides)
    config._attn_implementation = "eager"  # deterministic and identical on every backend
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        # The default init uses std 0.02: logits are then nearly uniform. A larger std gives the tiny model
        # outputs that differ by class and by input, so equality tests are not trivially satisfied.
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                torch.nn.init.normal_(param, std=0.08)
    model.generation_config.pad_token_id = 3
    return model.eval()


def save_tiny_model(path: str | os.PathLike, family: str = "llama", seed: int = 0, max_shard_size: str | None = None,
                    **config_overrides) -> Path:
    """Write a tiny model and the tokenizer to `path` as a local HF directory; returns the path."""
    path = Path(path)
    model = tiny_model(family, seed=seed, **config_overrides)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    make_tokenizer(model.config.vocab_size).save_pretrained(path)
    return path


def toy_texts(n: int = 32, style: str = "plain", seed: int = 0) -> list[str]:
    """Deterministic short sentences; `style` 'pirate' or 'formal' gives two easily told apart registers."""
    import random

    rng = random.Random(seed)
    subjects = ["the cat", "a ship", "the market", "my friend", "the river", "a teacher", "the storm", "our crew"]
    verbs = ["watches", "follows", "finds", "carries", "greets", "avoids", "builds", "reads"]
    objects = ["the map", "a lantern", "the bread", "old books", "the harbour", "a letter", "the garden", "gold"]
    out = []
    for _ in range(n):
        sentence = f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}"
        if style == "pirate":
            sentence = f"Arrr, {sentence}, matey!"
        elif style == "formal":
            sentence = f"Dear Sir, {sentence}. Sincerely."
        else:
            sentence = sentence.capitalize() + "."
        out.append(sentence)
    return out


def toy_chat_rows(n: int, seed: int, vocab_size: int = 384) -> list[dict]:
    """Tokenized chat-like rows of 5..10 random tokens: the first 2..4 are the prompt (labels -100), the rest
    the answer. Ids start at 4 so no row contains a special token."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(5, 11, (1,), generator=gen))
        prompt = int(torch.randint(2, 5, (1,), generator=gen))
        ids = torch.randint(4, vocab_size, (length,), generator=gen).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def toy_pair_rows(n: int, seed: int, vocab_size: int = 384) -> list[dict]:
    """Contrastive pairs of random token rows: `input_ids` (anchor, 3..8 tokens) and `input_ids_tgt` (positive)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        anchor, positive = (int(torch.randint(3, 9, (1,), generator=gen)) for _ in range(2))
        rows.append({"input_ids": torch.randint(4, vocab_size, (anchor,), generator=gen).tolist(),
                     "input_ids_tgt": torch.randint(4, vocab_size, (positive,), generator=gen).tolist()})
    return rows
