"""Reading, packing, caching and splitting of `craft train` datasets, checked against hand-computed rows."""

from __future__ import annotations

import json

import pytest
import torch

from craft.engine.config import DatasetConfig, TrainConfig
from craft.engine.data import MicroBatches, build_rows, load_or_build, pack_dataset, read_documents, split_rows
from craft.testing import make_tokenizer

BOS, EOS, PAD = 1, 2, 3


def test_packing_concatenates_documents_and_pads_the_last_sequence():
    docs = [[10, 11, 12, EOS], [20, 21, EOS], [30, EOS]]  # 9 tokens -> chunks of 4: 4 + 4 + 1
    rows = pack_dataset(docs, DatasetConfig(dataset_path="x", control_class=-1), 5, BOS, PAD)
    assert rows["input_ids"] == [[BOS, 10, 11, 12, EOS], [BOS, 20, 21, EOS, 30], [BOS, EOS, PAD, PAD, PAD]]
    assert rows["labels"] == [[-100, 10, 11, 12, EOS], [-100, 20, 21, EOS, 30], [-100, EOS, -100, -100, -100]]
    assert rows["attention_mask"][2] == [1, 1, 0, 0, 0]
    assert rows["control_classes"] == [[-1] * 5] * 3


def test_drop_tails_cuts_each_document_and_drops_partials():
    docs = [[10, 11, 12, 13, 14, EOS], [20, 21, EOS]]  # doc 0: one full chunk of 4 + tail; doc 1: only a tail
    rows = pack_dataset(docs, DatasetConfig(dataset_path="x", drop_tails=True), 5, BOS, PAD)
    assert rows["input_ids"] == [[BOS, 10, 11, 12, 13]]


def test_max_sequences_caps_a_dataset():
    docs = [[t, EOS] for t in range(10, 30)]
    rows = pack_dataset(docs, DatasetConfig(dataset_path="x", max_sequences=3), 5, BOS, PAD)
    assert len(rows["input_ids"]) == 3


def test_max_tokens_caps_a_dataset_in_whole_sequences():
    docs = [[t, EOS] for t in range(10, 30)]
    spec = DatasetConfig(dataset_path="x", max_tokens=14, max_sequences=5)  # floor(14 / 5) = 2 sequences of 5
    assert len(pack_dataset(docs, spec, 5, BOS, PAD)["input_ids"]) == 2


def test_all_formats_read_the_same_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["first document", "second one\nwith two lines"]
    (tmp_path / "a.json").write_text(json.dumps([{"text": t} for t in texts]))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    pq.write_table(pa.table({"text": texts, "other": [1, 2]}), tmp_path / "a.parquet")
    (tmp_path / "a.txt").write_text(texts[1])
    for name in ("a.json", "a.jsonl", "a.parquet"):
        assert read_documents(tmp_path / name) == texts
    assert read_documents(tmp_path / "a.txt") == [texts[1]]


def _config(tmp_path, datasets, **keys) -> TrainConfig:
    from craft.testing import save_tiny_model

    if not (tmp_path / "model" / "config.json").exists():
        save_tiny_model(tmp_path / "model")
    return TrainConfig(model_dir=str(tmp_path / "model"), output_dir=str(tmp_path / "out"), lora_rank=4, lr=1.0,
                       sequence_len=keys.pop("sequence_len", 16), datasets=datasets, **keys)


def test_rows_tokenize_with_bos_and_eos_and_carry_classes(tmp_path):
    tokenizer = make_tokenizer()
    (tmp_path / "pos.txt").write_text("The quick brown fox")
    (tmp_path / "neg.txt").write_text("jumps over the lazy dog.")
    config = _config(tmp_path, [{"dataset_path": str(tmp_path / "pos.txt"), "control_class": 1},
                                {"dataset_path": str(tmp_path / "neg.txt"), "control_class": -1}], sequence_len=32)
    rows = build_rows(config, tokenizer)
    for row, text, cls in zip(rows["input_ids"], ["The quick brown fox", "jumps over the lazy dog."], [1, -1]):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert row[:len(ids) + 2] == [BOS] + ids + [EOS]
        assert set(row[len(ids) + 2:]) <= {PAD}
    assert [r[0] for r in rows["control_classes"]] == [1, -1]


def test_document_prefix_and_suffix_surround_every_document(tmp_path):
    tokenizer = make_tokenizer()
    (tmp_path / "a.json").write_text(json.dumps([{"text": "The quick brown fox"}, {"text": "lazy dog."}]))
    config = _config(tmp_path, [{"dataset_path": str(tmp_path / "a.json"), "document_suffix": "!"}],
                     sequence_len=64, document_prefix="User: ", document_suffix="ignored")
    rows = build_rows(config, tokenizer)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    expected = [BOS] + encode("User: The quick brown fox!") + [EOS] + encode("User: lazy dog.!") + [EOS]
    assert rows["input_ids"][0][:len(expected)] == expected


def test_eval_split_is_deterministic_and_disjoint():
    rows = {"input_ids": [[i, i] for i in range(100)], "labels": [[i, i] for i in range(100)],
            "control_classes": [[1, 1]] * 100, "attention_mask": [[1, 1]] * 100}
    train_a, eval_a = split_rows(rows, 0.1, seed=7)
    train_b, eval_b = split_rows(rows, 0.1, seed=7)
    assert len(eval_a) == 10 and len(train_a) == 90
    assert eval_a["input_ids"] == eval_b["input_ids"] and train_a["input_ids"] == train_b["input_ids"]
    assert not {r[0] for r in eval_a["input_ids"]} & {r[0] for r in train_a["input_ids"]}


def test_cache_is_reused_and_keyed_by_settings(tmp_path, monkeypatch):
    import craft.engine.data as data
    from craft.engine.distributed import distributed_world
    from craft.testing import toy_texts

    (tmp_path / "d.json").write_text(json.dumps([{"text": t} for t in toy_texts(20)]))
    config = _config(tmp_path, [{"dataset_path": str(tmp_path / "d.json")}], eval_fraction=0.2)
    tokenizer = make_tokenizer()
    with distributed_world() as (rank, _):
        train, evals = load_or_build(config, tokenizer, rank)
        monkeypatch.setattr(data, "build_rows", lambda *a: pytest.fail("cache not reused"))
        again, _ = load_or_build(config, tokenizer, rank)
        assert torch.equal(train[:]["input_ids"], again[:]["input_ids"])
        monkeypatch.undo()
        longer, _ = load_or_build(config.model_copy(update={"sequence_len": 24}), tokenizer, rank)
    assert longer[0]["input_ids"].shape == (24,) and train[0]["input_ids"].shape == (16,)
    assert len(list((tmp_path / "out" / "dataset_cache").iterdir())) == 2


def test_micro_batches_shard_replicas_and_resume_mid_epoch():
    from datasets import Dataset

    n = 24
    dataset = Dataset.from_dict({"input_ids": [[i] * 4 for i in range(n)], "labels": [[i] * 4 for i in range(n)],
                                 "control_classes": [[1] * 4] * n, "attention_mask": [[1] * 4] * n})
    dataset = dataset.with_format("torch")
    replicas = [MicroBatches(dataset, 2, 3, 2, r, seed=0) for r in range(2)]
    assert replicas[0].steps == 2  # 24 rows / (2 per micro-batch * 3 accumulation * 2 replicas)
    seen = [[int(x[0][0][i, 0]) for x in r.iterate(epoch=0) for i in range(2)] for r in replicas]
    assert sorted(seen[0] + seen[1]) == list(range(n))  # every row exactly once across replicas
    resumed = [int(x[0][0][i, 0]) for x in replicas[0].iterate(epoch=0, start_step=1) for i in range(2)]
    assert resumed == seen[0][6:]
    other_epoch = [int(x[0][0][i, 0]) for x in replicas[0].iterate(epoch=1) for i in range(2)]
    assert other_epoch != seen[0]
