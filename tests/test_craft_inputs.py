"""Bad CRAFT input is one clear `UserError` at construction (empty or fully masked train_dataset, a bundle of other
rows), and settings under which the contrastive objective silently trains nothing warn, naming the knob."""

from __future__ import annotations

import warnings

import pytest
import torch
from datasets import Dataset

from craft.config import CRAFTSFTConfig
from craft.data import CRAFTCollator, make_craft_datasets
from craft.errors import UserError
from craft.testing import make_tokenizer, tiny_model, toy_chat_rows, toy_pair_rows
from craft.trainers import CRAFTSFTTrainer
from craft.validation import CRAFTNoOpWarning


def _args(**overrides):
    base = dict(output_dir="unused", per_device_train_batch_size=2, use_cpu=True, report_to=[], bf16=False,
                learning_rate=1e-2, logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True,
                craft_projection_dim=16, craft_temperature=0.1)
    return CRAFTSFTConfig(**{**base, **overrides})


def _trainer(sft_rows=None, **config):
    sft = Dataset.from_list(sft_rows if sft_rows is not None else toy_chat_rows(8, seed=1))
    bundle = make_craft_datasets(sft, contrastive_dataset=Dataset.from_list(toy_pair_rows(8, seed=2)))
    return CRAFTSFTTrainer(model=tiny_model("llama"), args=_args(**config), train_dataset=sft, craft_bundle=bundle,
                           data_collator=CRAFTCollator(pad_token_id=3), processing_class=make_tokenizer())


def _no_op_warnings(**config) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(**config)
    return [str(w.message) for w in caught if issubclass(w.category, CRAFTNoOpWarning)]


def test_no_op_settings_warn_and_name_the_knob():
    assert _no_op_warnings() == []  # the defaults: batches of 2, in-batch negatives, last-token pooling
    [single] = _no_op_warnings(per_device_train_batch_size=1)
    assert "holds 1 pair" in single and "craft_contrastive_batch_size" in single
    assert _no_op_warnings(per_device_train_batch_size=1, craft_negative_strategy="queue") == []
    assert _no_op_warnings(per_device_train_batch_size=1, craft_contrastive_batch_size=4) == []
    [cls] = _no_op_warnings(craft_pooling="cls")
    assert "craft_pooling='last_token'" in cls
    [alpha] = _no_op_warnings(craft_alpha=1.0)
    assert "craft_alpha=1" in alpha and "weight 1 - alpha = 0" in alpha
    [beta] = _no_op_warnings(craft_beta=1.0, craft_alpha=0.5)
    assert "craft_beta=1 schedules no contrastive micro-batch" in beta


def test_a_single_pair_batch_really_has_zero_loss():
    """Why the warning exists: InfoNCE over one pair without other candidates is exactly 0."""
    trainer = _trainer(per_device_train_batch_size=1)
    loss, logits, _ = trainer.craft_objective(torch.randn(1, 64), torch.randn(1, 64))
    assert float(loss) == 0.0 and logits.shape == (1, 1)


def test_empty_train_dataset_is_a_user_error():
    sft = Dataset.from_list(toy_chat_rows(4, seed=1))
    bundle = make_craft_datasets(sft, contrastive_dataset=Dataset.from_list(toy_pair_rows(4, 2)))
    with pytest.raises(UserError, match="train_dataset is empty"):
        CRAFTSFTTrainer(model=tiny_model("llama"), args=_args(), train_dataset=sft.select([]), craft_bundle=bundle,
                        processing_class=make_tokenizer())


def test_all_masked_labels_are_a_user_error():
    rows = [{**r, "labels": [-100] * len(r["labels"])} for r in toy_chat_rows(4, seed=1)]
    with pytest.raises(UserError, match="every row's 'labels' are -100 \\(4 rows\\)"):
        _trainer(rows)


def test_bundle_from_other_rows_than_train_dataset_is_a_user_error():
    bundle = make_craft_datasets(Dataset.from_list(toy_chat_rows(8, seed=1)),
                                 contrastive_dataset=Dataset.from_list(toy_pair_rows(4, 2)))
    for other, message in ((toy_chat_rows(8, seed=9), "row 0, column 'attention_mask'|row 0, column 'input_ids'"),
                           (toy_chat_rows(5, seed=1), "dataset of 8 rows but train_dataset has 5")):
        with pytest.raises(UserError, match=message):
            CRAFTSFTTrainer(model=tiny_model("llama"), args=_args(), train_dataset=Dataset.from_list(other),
                            craft_bundle=bundle, processing_class=make_tokenizer())


def test_text_in_a_token_column_is_a_user_error_naming_column_and_row():
    text_ids = [{**r, "input_ids": "the cat sat"} for r in toy_chat_rows(4, seed=1)]
    with pytest.raises(UserError, match=r"row 0 of the train_dataset: column 'input_ids' holds text \('the cat sat'\)"):
        _trainer(text_ids)
    text_labels = [{**r, "labels": ["the", "cat"]} for r in toy_chat_rows(4, seed=1)]  # failed deep in int() before
    with pytest.raises(UserError, match=r"row 0 of the train_dataset: column 'labels' holds text"):
        _trainer(text_labels)
    pairs = toy_pair_rows(4, seed=2)
    pairs[3] = {**pairs[3], "input_ids_tgt": "a ship sails"}  # a list of dicts: the first bad row is named
    with pytest.raises(UserError, match=r"row 3 of the contrastive dataset: column 'input_ids_tgt' holds text"):
        make_craft_datasets(toy_chat_rows(4, seed=1), contrastive_dataset=pairs)


def test_paired_row_without_its_positive_is_a_user_error_naming_column_and_row():
    """`datasets` fills a key some rows lack with None: the column exists, row 2 has no positive (it trained
    silently before, with that row's positive dropped by the collator)."""
    pairs = toy_pair_rows(4, seed=2)
    pairs[2] = {"input_ids": pairs[2]["input_ids"]}
    with pytest.raises(UserError, match=r"row 2 of the contrastive dataset has no 'input_ids_tgt' \(None\)"):
        make_craft_datasets(Dataset.from_list(toy_chat_rows(4, seed=1)), contrastive_dataset=Dataset.from_list(pairs))
