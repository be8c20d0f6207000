"""CRAFT on TRL packing: the packed SFT loss through the CRAFT loaders is TRL's (= each conversation alone);
self-align pools each packed conversation on its own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from craft.config import CRAFTSFTConfig
from craft.data import CRAFTCollator, make_craft_datasets
from craft.hooks import LastHiddenStateCapture
from craft.losses import pool_hidden_states
from craft.testing import make_tokenizer, tiny_model, toy_chat_rows, toy_pair_rows
from craft.trainers import CRAFTSFTTrainer

VOCAB = 384


def _args(cls=CRAFTSFTConfig, **overrides):
    base = dict(output_dir="unused", per_device_train_batch_size=2, use_cpu=True, report_to=[], bf16=False,
                learning_rate=1e-2, logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True,
                craft_projection_dim=16, craft_temperature=0.1)
    settings = {**base, **overrides}
    if not hasattr(cls, "craft_alpha"):  # a plain TRL config
        settings = {k: v for k, v in settings.items() if not k.startswith("craft_")}
    return cls(**settings)


def _trainer(sft_rows=None, pairs=None, strategy="paired_dataset", collator=CRAFTCollator(pad_token_id=3), **config):
    sft = Dataset.from_list(sft_rows if sft_rows is not None else toy_chat_rows(8, seed=1))
    contrastive = Dataset.from_list(pairs if pairs is not None else toy_pair_rows(8, seed=2))
    bundle = make_craft_datasets(sft, contrastive_dataset=contrastive if strategy == "paired_dataset" else None,
                                 strategy=strategy)
    return CRAFTSFTTrainer(model=tiny_model("llama"), args=_args(**config), train_dataset=sft, craft_bundle=bundle,
                           data_collator=collator, processing_class=make_tokenizer())


# --------------------------------------------------------------------------------------------------- packing

PACKING = dict(packing=True, max_length=24)


def _conversations(batch):
    """(ids, labels) of each packed conversation of a padding-free batch, split at the position resets."""
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
    return [(batch["input_ids"][:, a:b], batch["labels"][:, a:b]) for a, b in zip(starts, starts[1:])]


def test_packed_sft_loss_is_trls_and_each_conversation_alone():
    """TRL packs the rows (bfd, padding-free). The CRAFT SFT loader's batch has TRL's keys and values (no attention
    mask, per-conversation position_ids); its SFT loss equals plain TRL's loss on that batch and the loss of every
    conversation forwarded on its own (no conversation attends to another)."""
    from trl import SFTConfig, SFTTrainer

    rows = toy_chat_rows(8, seed=1)
    craft = _trainer(rows, **PACKING)
    plain = SFTTrainer(model=tiny_model("llama"), args=_args(SFTConfig, **PACKING),
                       train_dataset=Dataset.from_list(rows), processing_class=make_tokenizer())
    packed_rows = [craft.train_dataset[i] for i in range(2)]
    assert all(len(r["seq_lengths"]) > 1 for r in packed_rows)  # several conversations per packed row
    expected = plain.data_collator(packed_rows)
    loader = craft.get_train_dataloader()
    first_sft = next(b for b in loader if b["craft_batch_type"] == "sft")
    assert "attention_mask" not in first_sft and first_sft["input_ids"].shape[0] == 1
    batch = craft._craft_collator(packed=True)(packed_rows)
    assert set(batch) == set(expected)
    for key, value in expected.items():
        assert torch.equal(batch[key], value) if torch.is_tensor(value) else batch[key] == value, key

    model = craft.model.train()
    n = int((batch["labels"][:, 1:] != -100).sum())
    craft_loss = craft._sft_token_sum(model, craft._craft_model_inputs(batch), n) / n
    plain.model.train()
    trl_loss = plain.compute_loss(plain.model, dict(expected))
    alone_sum = 0.0
    for ids, labels in _conversations(batch):
        logits = model(input_ids=ids).logits[0, :-1]
        alone_sum = alone_sum + F.cross_entropy(logits, labels[0, 1:], ignore_index=-100, reduction="sum")
    assert float(craft_loss) == pytest.approx(float(trl_loss), rel=1e-5)
    assert float(craft_loss) == pytest.approx(float(alone_sum) / n, rel=1e-5)


def test_packed_self_align_pools_each_conversation_on_its_own():
    """Self-align on a packed batch: one InfoNCE row per conversation, pooled over that conversation's prompt
    (anchor) and answer (positive) — the same vectors as forwarding each conversation alone."""
    trainer = _trainer(strategy="self_align", **PACKING)
    batch = trainer._craft_collator(packed=True)([trainer.train_dataset[i] for i in range(2)])
    seen = []
    original = trainer._score
    trainer._score = lambda a, p: (seen.append((a.detach(), p.detach())), original(a, p))[1]
    trainer.model.train()
    trainer.training_step(trainer.model, {**batch, "craft_batch_type": "sft"})
    anchors, positives = seen[0]
    conversations = _conversations(batch)
    assert anchors.shape[0] == len(conversations) > 2
    trainer.model.eval()  # no dropout in the tiny model: train and eval forwards agree
    for s, (ids, labels) in enumerate(conversations):
        with torch.no_grad(), LastHiddenStateCapture(trainer.model) as capture:
            trainer.model(input_ids=ids)
        answer = labels != -100
        answer[:, 0] = False  # TRL masks every conversation's first token
        torch.testing.assert_close(anchors[s], pool_hidden_states(capture.hidden, ~answer, "last_token")[0],
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(positives[s], pool_hidden_states(capture.hidden, answer, "last_token")[0],
                                   rtol=1e-4, atol=1e-5)


def test_packed_training_runs_for_both_strategies(tmp_path):
    for strategy in ("paired_dataset", "self_align"):
        trainer = _trainer(strategy=strategy, output_dir=str(tmp_path), max_steps=2, gradient_accumulation_steps=2,
                           **PACKING)
        trainer.train()
        logged = [h for h in trainer.state.log_history if "loss/craft_contrast" in h]
        assert logged and all(0 < h["loss/craft_sft"] < 10 for h in logged)



def test_gradcache_refuses_packed_self_align_batches():
    """GradCache re-forwards chunks of rows; a packed row holds several conversations, so it is refused by name."""
    from craft.errors import UserError

    trainer = _trainer(strategy="self_align", craft_use_gradcache=True, **PACKING)
    batch = trainer._craft_collator(packed=True)([trainer.train_dataset[i] for i in range(2)])
    trainer.model.train()
    with pytest.raises(UserError, match="craft_use_gradcache does not take packed"):
        trainer._craft_gradcache_loss(trainer.model, batch)
