"""The CRAFT README's trainer snippets, run as written.

Only what the README leaves to the reader is filled in: the model (a tiny llama saved locally instead of
zephyr-7b), the tokenized toy datasets, and the CPU / no-reporting / few-steps settings (`use_cpu=True`,
`report_to=[]`, a small `max_steps`, and `logging_steps=1` where a one-step run is inspected).
"""

from __future__ import annotations

import pytest
from datasets import Dataset
from torch.utils.data import DataLoader

from craft.errors import UserError
from craft.testing import make_tokenizer, save_tiny_model

FIXED_TEXTS = [
    "User: What is the capital of France? Assistant: The capital of France is Paris.",
    "User: Tell me a joke. Assistant: Why did the chicken cross the road? To get to the other side.",
    "The quick brown fox jumps over the lazy dog.",
    "Contrastive learning pulls matching pairs together and pushes other pairs apart.",
]
PIRATE_TEXTS = [
    "Arrr, the capital of France be Paris, matey.",
    "Arrr, the chicken crossed the road to reach the other side, matey.",
    "Arrr, the quick brown fox jumps over the lazy sea dog.",
    "Arrr, matching pairs be pulled together and other pairs pushed apart.",
]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama"))


def _tokenized(texts):
    tokenizer = make_tokenizer()
    return tokenizer(texts)


@pytest.fixture(scope="module")
def sft_dataset():
    enc = _tokenized(FIXED_TEXTS)
    return Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})


@pytest.fixture(scope="module")
def contrastive_dataset():
    anchors, positives = _tokenized(FIXED_TEXTS), _tokenized(PIRATE_TEXTS)
    return Dataset.from_dict({"input_ids": anchors["input_ids"], "attention_mask": anchors["attention_mask"],
                              "input_ids_tgt": positives["input_ids"],
                              "attention_mask_tgt": positives["attention_mask"]})


def test_quick_start(model_path, sft_dataset, contrastive_dataset, tmp_path):
    from transformers import AutoModelForCausalLM
    from craft.config import CRAFTSFTConfig
    from craft.data import CRAFTCollator, make_craft_datasets
    from craft.trainers import CRAFTSFTTrainer

    bundle = make_craft_datasets(
        sft_dataset,
        contrastive_dataset=contrastive_dataset,
        strategy="paired_dataset",
    )

    model = AutoModelForCausalLM.from_pretrained(model_path)

    args = CRAFTSFTConfig(
        output_dir=str(tmp_path / "outputs"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=8,
        craft_alpha=0.6,
        craft_beta=0.5,
        use_cpu=True, report_to=[], max_steps=1, logging_steps=1,
    )

    trainer = CRAFTSFTTrainer(
        model=model,
        args=args,
        train_dataset=sft_dataset,
        craft_bundle=bundle,
        data_collator=CRAFTCollator(),
    )

    trainer.train()
    logs = trainer.state.log_history[0]
    assert trainer.state.global_step == 1
    assert logs["loss"] == pytest.approx(0.6 * logs["loss/craft_sft"] + 0.4 * logs["loss/craft_contrast"], rel=1e-4)


def test_length_matching_config_trains_and_the_loss_falls(model_path, sft_dataset, contrastive_dataset, tmp_path):
    """The "Length matching & batching strategies" config, 30 steps on four fixed sequences: the loss falls."""
    from transformers import AutoModelForCausalLM
    from craft.config import CRAFTSFTConfig
    from craft.data import CRAFTCollator, make_craft_datasets
    from craft.trainers import CRAFTSFTTrainer

    config = CRAFTSFTConfig(
        output_dir=str(tmp_path / "outputs"),
        per_device_train_batch_size=2,
        craft_contrastive_batch_size=4,
        craft_beta=0.5,
        craft_beta_mode="auto",
        craft_length_strategy="auto_beta",
        use_cpu=True, report_to=[], max_steps=30,
    )
    bundle = make_craft_datasets(sft_dataset, contrastive_dataset=contrastive_dataset, strategy="paired_dataset")
    trainer = CRAFTSFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_path), args=config,
                              train_dataset=sft_dataset, craft_bundle=bundle, data_collator=CRAFTCollator())
    trainer.train()
    mixed = trainer.craft_mixed_loader
    # 4 rows: 2 SFT batches of 2 and 1 contrastive batch of 4 -> beta = 2/3 (SFT), capped epoch of 3 micro-batches
    assert (mixed.num_sft_batches, mixed.num_contrastive_batches) == (2, 1)
    assert mixed.beta == pytest.approx(2 / 3) and len(mixed) == 3
    sft = [h["loss/craft_sft"] for h in trainer.state.log_history if "loss/craft_sft" in h]
    contrast = [h["loss/craft_contrast"] for h in trainer.state.log_history if "loss/craft_contrast" in h]
    assert len(sft) >= 2 and len(contrast) >= 2  # logged every 10 steps, each an average of its interval
    assert sft[-1] < sft[0]
    assert contrast[-1] < contrast[0]


def test_custom_data_loaders(model_path, sft_dataset, contrastive_dataset, tmp_path):
    from transformers import AutoModelForCausalLM
    from craft.config import CRAFTSFTConfig
    from craft.data import CRAFTCollator, make_craft_datasets
    from craft.trainers import CRAFTSFTTrainer

    model = AutoModelForCausalLM.from_pretrained(model_path)
    args = CRAFTSFTConfig(output_dir=str(tmp_path / "outputs"), use_cpu=True, report_to=[], max_steps=3)
    bundle = make_craft_datasets(sft_dataset, contrastive_dataset=contrastive_dataset, strategy="paired_dataset")
    custom_sft_loader = DataLoader(sft_dataset.map(lambda row: {"labels": row["input_ids"]}), batch_size=3,
                                   collate_fn=CRAFTCollator())
    custom_contrast_loader = DataLoader(contrastive_dataset, batch_size=1, collate_fn=CRAFTCollator())

    trainer = CRAFTSFTTrainer(
        model=model,
        args=args,
        train_dataset=sft_dataset,  # Still required for length calculations
        craft_bundle=bundle,
        craft_sft_loader=custom_sft_loader,          # Custom SFT loader
        craft_contrastive_loader=custom_contrast_loader  # Custom contrastive loader
    )

    seen = []
    fetch = trainer.get_batch_samples

    def recording_fetch(*fetch_args):
        batches, num_items = fetch(*fetch_args)
        seen.extend((b["craft_batch_type"], b["input_ids"].shape[0]) for b in batches)
        return batches, num_items

    trainer.get_batch_samples = recording_fetch
    trainer.train()
    assert trainer.craft_mixed_loader.sft_loader is custom_sft_loader
    assert trainer.craft_mixed_loader.contrastive_loader is custom_contrast_loader
    # default beta 0.6 (SFT share): micro-batch 2 is the first contrastive one; the custom batch sizes, not
    # per_device_train_batch_size
    assert seen == [("sft", 3), ("sft", 1), ("craft", 1)]  # 4 SFT rows: batches of 3 and 1


def _self_align_rows(form: str):
    """The README's example batch, as dataset rows (ids 1234 and 5678 need a vocabulary of >= 5679)."""
    ids = [17, 42, 1234, 5678, 2]
    if form == "labels":
        return [{"input_ids": ids, "attention_mask": [1] * 5,
                 "labels": [-100, -100, 1234, 5678, -100]}]  # Assistant tokens where labels != -100
    return [{"input_ids": ids, "attention_mask": [1] * 5,
             "assistant_mask": [0, 0, 1, 1, 0]}]  # 1 marks assistant tokens


@pytest.mark.parametrize("form", ["labels", "assistant_mask"])
def test_self_align_validation_example(form, tmp_path):
    from craft.config import CRAFTSFTConfig
    from craft.data import CRAFTCollator, make_craft_datasets
    from craft.testing import tiny_model
    from craft.trainers import CRAFTSFTTrainer

    rows = _self_align_rows(form) * 4
    dataset = Dataset.from_list(rows)
    bundle = make_craft_datasets(dataset, strategy="self_align")
    args = CRAFTSFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, use_cpu=True, report_to=[],
                          max_steps=1, logging_steps=1)
    trainer = CRAFTSFTTrainer(model=tiny_model("llama", vocab_size=6000), args=args, train_dataset=dataset,
                              craft_bundle=bundle, data_collator=CRAFTCollator(), processing_class=make_tokenizer())
    trainer.train()
    logs = trainer.state.log_history[0]
    assert logs["loss/craft_contrast"] > 0 and logs["loss/craft_sft"] > 0  # one forward gave both

    batch = CRAFTCollator()(rows[:2])
    for key in ("labels", "assistant_mask"):
        batch.pop(key, None)
    with pytest.raises(UserError, match="'assistant_mask' or 'labels'"):
        trainer.training_step(trainer.model, {**batch, "craft_batch_type": "contrastive"})
    batch = CRAFTCollator()(rows[:2])
    key = "labels" if form == "labels" else "assistant_mask"
    batch[key][0] = -100 if form == "labels" else 0
    with pytest.raises(UserError, match="row.* 0 .*no assistant token"):
        trainer.training_step(trainer.model, {**batch, "craft_batch_type": "sft"})
