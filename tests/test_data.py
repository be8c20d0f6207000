"""Dataset validation, the collator's padding and the mixed SFT / contrastive micro-batch schedule."""

import math
from fractions import Fraction

import pytest
import torch
from datasets import Dataset

from craft.data import (CONTRASTIVE, CRAFTCollator, CRAFTDatasetBundle, CRAFTMixedDataLoader, assistant_token_mask,
                        build_loader, is_contrastive_step, make_craft_datasets)
from craft.errors import UserError

# ------------------------------------------------------------------------------------------------ make_craft_datasets

SFT_ROWS = [{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]}, {"input_ids": [1, 7], "labels": [-100, 7]}]
PAIR_ROWS = [{"input_ids": [1, 5], "input_ids_tgt": [1, 6, 7]}, {"input_ids": [1, 8], "input_ids_tgt": [9]}]


@pytest.mark.parametrize("as_hf", [False, True])
def test_make_craft_datasets_accepts_valid_inputs(as_hf):
    sft = Dataset.from_list(SFT_ROWS) if as_hf else SFT_ROWS
    pairs = Dataset.from_list(PAIR_ROWS) if as_hf else PAIR_ROWS
    bundle = make_craft_datasets(sft, contrastive_dataset=pairs, strategy="paired_dataset")
    assert isinstance(bundle, CRAFTDatasetBundle)
    assert (bundle.sft_dataset, bundle.contrastive_dataset, bundle.strategy) == (sft, pairs, "paired_dataset")
    bundle = make_craft_datasets(sft, strategy="self_align")
    assert bundle.contrastive_dataset is sft and bundle.strategy == "self_align"
    masked = [{"input_ids": [1, 2], "assistant_mask": [0, 1]}]
    assert make_craft_datasets(masked, strategy="self_align").assistant_mask_key == "assistant_mask"
    custom = [{"input_ids": [1, 2], "assistant_masks": [0, 1]}]
    assert make_craft_datasets(custom, strategy="self_align", assistant_mask_key="assistant_masks").strategy


@pytest.mark.parametrize("as_hf", [False, True])
def test_make_craft_datasets_errors_name_the_missing_column(as_hf):
    def ds(rows):
        return Dataset.from_list(rows) if as_hf else rows

    with pytest.raises(UserError, match="needs a contrastive_dataset"):
        make_craft_datasets(ds(SFT_ROWS), strategy="paired_dataset")
    with pytest.raises(UserError, match="'input_ids_tgt'"):
        make_craft_datasets(ds(SFT_ROWS), contrastive_dataset=ds([{"input_ids": [1, 2]}]))
    with pytest.raises(UserError, match="'input_ids'"):
        make_craft_datasets(ds(SFT_ROWS), contrastive_dataset=ds([{"input_ids_tgt": [1, 2]}]))
    with pytest.raises(UserError, match="'labels' or 'assistant_mask'"):
        make_craft_datasets(ds([{"input_ids": [1, 2]}]), strategy="self_align")
    with pytest.raises(UserError, match="paired_dataset, self_align"):
        make_craft_datasets(ds(SFT_ROWS), strategy="mirror")


def test_make_craft_datasets_names_the_row_of_an_irregular_list():
    rows = [{"input_ids": [1], "input_ids_tgt": [2]}, {"input_ids": [3]}]
    with pytest.raises(UserError, match=r"row 1 of the contrastive dataset has no 'input_ids_tgt'"):
        make_craft_datasets(SFT_ROWS, contrastive_dataset=rows)
    with pytest.raises(UserError, match="empty"):
        make_craft_datasets([], strategy="self_align")


def test_assistant_token_mask_prefers_the_mask_column_and_rejects_empty_rows():
    batch = {"labels": torch.tensor([[-100, 5, 6], [-100, -100, 7]]),
             "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 1]])}
    assert assistant_token_mask(batch).tolist() == [[0, 1, 1], [0, 0, 1]]
    batch["assistant_mask"] = torch.tensor([[0, 0, 1], [0, 1, 1]])
    assert assistant_token_mask(batch).tolist() == [[0, 0, 1], [0, 1, 1]]
    batch["assistant_mask"] = torch.tensor([[0, 0, 1], [0, 0, 0]])
    with pytest.raises(UserError, match="row 1 of the batch has no assistant token"):
        assistant_token_mask(batch)
    with pytest.raises(UserError, match="'assistant_mask' or 'labels'"):
        assistant_token_mask({"input_ids": torch.ones(1, 2)})


# ------------------------------------------------------------------------------------------------ collator

FEATURES = [
    {"input_ids": [1, 5, 6], "labels": [-100, 5, 6], "assistant_mask": [0, 1, 1], "control_classes": [1, 1, 1],
     "input_ids_tgt": [9], "text": "first", "score": 0.5},
    {"input_ids": [1], "labels": [-100], "assistant_mask": [0], "control_classes": [-1],
     "input_ids_tgt": [9, 8, 7, 6], "attention_mask_tgt": [1, 1, 1, 0], "text": "second", "score": 2.0},
]


def test_collator_pads_each_group_to_its_own_length_on_the_right():
    batch = CRAFTCollator(pad_token_id=3)(FEATURES)
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 3, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]  # built: there was none
    assert batch["labels"].tolist() == [[-100, 5, 6], [-100, -100, -100]]
    assert batch["assistant_mask"].tolist() == [[0, 1, 1], [0, 0, 0]]
    assert batch["control_classes"].tolist() == [[1, 1, 1], [-1, 0, 0]]
    assert batch["input_ids_tgt"].tolist() == [[9, 3, 3, 3], [9, 8, 7, 6]]
    assert batch["attention_mask_tgt"].tolist() == [[1, 0, 0, 0], [1, 1, 1, 0]]  # built for row 0, kept for row 1
    torch.testing.assert_close(batch["score"], torch.tensor([0.5, 2.0]))
    assert "text" not in batch
    assert all(v.dtype == torch.long for k, v in batch.items() if k != "score")


def test_collator_left_padding_multiple_of_and_extra_token_columns():
    feats = [{"input_ids": torch.tensor([1, 5, 6]), "attention_mask": [1, 1, 1], "completion_mask": [0, 1, 1]},
             {"input_ids": [1, 2], "attention_mask": [1, 1], "completion_mask": [0, 1]}]
    batch = CRAFTCollator(pad_token_id=0, pad_to_multiple_of=4, padding_side="left")(feats)
    assert batch["input_ids"].tolist() == [[0, 1, 5, 6], [0, 0, 1, 2]]
    assert batch["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 1, 1]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 1], [0, 0, 0, 1]]
    labelled = CRAFTCollator(add_labels=True)(feats)
    assert labelled["labels"].tolist() == [[1, 5, 6], [1, 2, -100]]


def test_collator_errors_name_feature_and_column():
    with pytest.raises(UserError, match=r"column 'labels' of feature 1 has length 1 but its input_ids has length 2"):
        CRAFTCollator()([{"input_ids": [1], "labels": [1]}, {"input_ids": [1, 2], "labels": [1]}])
    with pytest.raises(UserError, match=r"feature 1 has no 'labels'"):
        CRAFTCollator()([{"input_ids": [1], "labels": [1]}, {"input_ids": [1, 2]}])
    with pytest.raises(UserError):
        CRAFTCollator(padding_side="middle")


# ------------------------------------------------------------------------------------------------ mixed loader

def _loader(tag, n):
    return [{"tag": tag, "index": torch.tensor([i])} for i in range(n)]


def _rule(k, gamma):
    """Whether micro-batch k is contrastive for the contrastive fraction gamma = 1 - beta."""
    gamma = Fraction(gamma)
    return math.floor((k + 1) * gamma) > math.floor(k * gamma)


def _run(mixed):
    batches = list(mixed)
    assert len(mixed) == len(batches)
    assert [b["craft_batch_type"] for b in batches] == mixed.schedule()
    return batches


@pytest.mark.parametrize("gamma", [0, 0.25, 0.5, 0.75, 1])  # contrastive fraction, beta = 1 - gamma
@pytest.mark.parametrize("ga", [1, 2, 4, 8])
@pytest.mark.parametrize("n_sft,n_con", [(7, 3), (3, 11), (5, 5)])
def test_oversample_follows_the_schedule_rule_and_consumes_everything(gamma, ga, n_sft, n_con):
    mixed = CRAFTMixedDataLoader(_loader("s", n_sft), _loader("c", n_con), beta=1 - gamma,
                                 gradient_accumulation_steps=ga)
    batches = _run(mixed)
    for k, batch in enumerate(batches):
        expected = "craft" if _rule(k, gamma) else "sft"
        assert batch["craft_batch_type"] == expected == ("craft" if batch["tag"] == "c" else "sft")
        assert is_contrastive_step(k, 1 - gamma) == (expected == "craft")
    sft_seen = [int(b["index"]) for b in batches if b["tag"] == "s"]
    con_seen = [int(b["index"]) for b in batches if b["tag"] == "c"]
    if gamma < 1:
        assert set(sft_seen) == set(range(n_sft))  # no SFT batch skipped
        assert sft_seen[:n_sft] == list(range(n_sft))  # in order, before any restart
    if gamma > 0:
        assert set(con_seen) == set(range(n_con))
    # minimal: dropping the last micro-batch would leave a loader not fully consumed
    last = batches[-1]["tag"]
    seen_last = sft_seen if last == "s" else con_seen
    assert len(seen_last) == (n_sft if last == "s" else n_con)
    # each accumulation window holds floor((w+1)·GA·γ) − floor(w·GA·γ) contrastive micro-batches
    for w, (n_s, n_c) in enumerate(mixed.windows()):
        size = min(ga, len(batches) - w * ga)
        assert n_s + n_c == size
        assert n_c == math.floor((w * ga + size) * Fraction(gamma)) - math.floor(w * ga * Fraction(gamma))


@pytest.mark.parametrize("gamma", [0.25, 0.5, 0.75])
def test_ga1_alternates_both_objectives(gamma):
    types = CRAFTMixedDataLoader(_loader("s", 8), _loader("c", 8), beta=1 - gamma).schedule()
    assert "sft" in types[:4] and "craft" in types[:4]


@pytest.mark.parametrize("gamma", [0, 0.25, 0.5, 0.75, 1])  # contrastive fraction, beta = 1 - gamma
@pytest.mark.parametrize("n_sft,n_con", [(7, 3), (3, 11), (6, 2)])
def test_cap_stops_before_any_restart(gamma, n_sft, n_con):
    mixed = CRAFTMixedDataLoader(_loader("s", n_sft), _loader("c", n_con), beta=1 - gamma, length_strategy="cap")
    batches = _run(mixed)
    for k, batch in enumerate(batches):
        assert batch["craft_batch_type"] == ("craft" if _rule(k, gamma) else "sft")
    sft = [int(b["index"]) for b in batches if b["tag"] == "s"]
    con = [int(b["index"]) for b in batches if b["tag"] == "c"]
    assert sft == list(range(len(sft))) and con == list(range(len(con)))  # nothing repeated
    nxt = "c" if _rule(len(batches), gamma) else "s"
    assert (len(con) == n_con) if nxt == "c" else (len(sft) == n_sft)  # the next batch would need a restart


@pytest.mark.parametrize("n_sft,n_con", [(7, 3), (3, 11), (5, 5), (1, 9)])
@pytest.mark.parametrize("ga", [1, 4])
def test_auto_beta_caps_and_ends_both_loaders_together(n_sft, n_con, ga):
    mixed = CRAFTMixedDataLoader(_loader("s", n_sft), _loader("c", n_con), beta=0.5, gradient_accumulation_steps=ga,
                                 length_strategy="auto_beta")
    assert mixed.beta == pytest.approx(n_sft / (n_con + n_sft))
    batches = _run(mixed)
    assert len(batches) == n_sft + n_con
    assert sorted(int(b["index"]) for b in batches if b["tag"] == "s") == list(range(n_sft))
    assert sorted(int(b["index"]) for b in batches if b["tag"] == "c") == list(range(n_con))
    for k, batch in enumerate(batches):
        assert batch["craft_batch_type"] == ("craft" if _rule(k, Fraction(n_con, n_con + n_sft)) else "sft")
    auto_mode = CRAFTMixedDataLoader(_loader("s", n_sft), _loader("c", n_con), beta=0.9, beta_mode="auto")
    assert auto_mode.beta == mixed.beta and auto_mode.schedule() == mixed.schedule()


def test_error_strategy_raises_only_when_lengths_diverge():
    with pytest.raises(UserError, match="do not match the beta schedule"):
        CRAFTMixedDataLoader(_loader("s", 7), _loader("c", 3), beta=0.5, length_strategy="error")
    mixed = CRAFTMixedDataLoader(_loader("s", 6), _loader("c", 2), beta=0.75, length_strategy="error")
    assert len(_run(mixed)) == 8
    mixed = CRAFTMixedDataLoader(_loader("s", 4), _loader("c", 4), beta=0.5, length_strategy="error")
    assert len(_run(mixed)) == 8


def test_beta_extremes_need_only_one_loader_and_bad_arguments_are_errors():
    assert _run(CRAFTMixedDataLoader(_loader("s", 4), None, beta=1)) and \
        CRAFTMixedDataLoader(_loader("s", 4), None, beta=1).schedule() == ["sft"] * 4
    assert CRAFTMixedDataLoader(_loader("s", 4), None, beta=0.5).schedule() == ["sft"] * 4  # nothing to mix in
    assert CRAFTMixedDataLoader(None, _loader("c", 3), beta=0).schedule() == ["craft"] * 3
    with pytest.raises(UserError, match="SFT loader is missing or empty"):
        CRAFTMixedDataLoader(None, _loader("c", 3), beta=0.5)
    with pytest.raises(UserError, match="oversample, cap, auto_beta, error"):
        CRAFTMixedDataLoader(_loader("s", 4), _loader("c", 4), beta=0.5, length_strategy="zip")
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        CRAFTMixedDataLoader(_loader("s", 4), _loader("c", 4), beta=1.5)
    with pytest.raises(UserError, match="fixed, auto"):
        CRAFTMixedDataLoader(_loader("s", 4), _loader("c", 4), beta=0.5, beta_mode="dynamic")


def test_with_real_dataloaders_collator_and_set_epoch():
    collator = CRAFTCollator(pad_token_id=3)
    sft_rows = [{"input_ids": list(range(1, 2 + i % 3)), "labels": list(range(1, 2 + i % 3))} for i in range(10)]
    sft_loader = build_loader(Dataset.from_list(sft_rows), 2, collator, shuffle=True, seed=0)
    con_loader = build_loader(PAIR_ROWS * 3, 4, collator, shuffle=False, seed=0, num_replicas=2, rank=1)
    mixed = CRAFTMixedDataLoader(sft_loader, con_loader, beta=0.5, gradient_accumulation_steps=2)
    assert (len(sft_loader), len(con_loader)) == (5, 1)
    batches = _run(mixed)
    assert len(batches) == 9
    for batch in batches:
        if batch["craft_batch_type"] == "craft":
            assert {"input_ids", "attention_mask", "input_ids_tgt", "attention_mask_tgt"} <= set(batch)
        else:
            assert batch["labels"].shape == batch["input_ids"].shape
    mixed.set_epoch(3)
    assert mixed.passes_per_epoch() == {"sft": 1, CONTRASTIVE: 4}  # 4 contrastive micro-batches of a 1-batch loader
    assert con_loader.sampler.epoch == 12  # epoch 3 starts at contrastive pass 3 * 4
    first = [b["input_ids"].tolist() for b in build_loader(sft_rows, 2, collator, shuffle=True, seed=7)]
    again = [b["input_ids"].tolist() for b in build_loader(sft_rows, 2, collator, shuffle=True, seed=7)]
    assert first == again
