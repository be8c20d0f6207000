"""Datasets for `craft train`: read text files, tokenize, pack into fixed-length sequences, cache, split.

Every `[[datasets]]` entry names a glob of `.txt` (the whole file is one document), `.json` (a list of
`{"text": ...}`), `.jsonl` (one `{"text": ...}` per line) or `.parquet` (a `text` column) files.

Packing, per dataset (sequences never mix datasets, so every token of a sequence has the dataset's class):
each document, with the dataset's `document_prefix` / `document_suffix` text around it, is tokenized without
special tokens and followed by EOS. With `drop_tails = false` the documents
are concatenated and cut into chunks of `sequence_len - 1` tokens; each sequence is `[BOS] + chunk`, and the
last, partial sequence of the pack is right-padded. With `drop_tails = true` each document is cut on its own and
its partial last chunk is dropped (a document shorter than one sequence contributes nothing).

Columns of every row (length `sequence_len`):
  input_ids       token ids, BOS first
  labels          input_ids with BOS and padding positions set to -100 (the model shifts them by one)
  control_classes the class of the token each position predicts (position t carries the class of token t+1,
                  the adapters' convention); constant within a sequence because sequences are per dataset.
  attention_mask  1 for real tokens, 0 for padding (padding is left out of the class-0 auxiliary loss)

The packed rows are cached with `datasets.save_to_disk` under `output_dir/dataset_cache/<key>`, where the key
hashes the files (path, size, mtime), the tokenizer files and every setting that changes the rows; rank 0 builds,
the other ranks wait on a barrier and load. The eval split takes a deterministic `eval_fraction` of the shuffled
rows.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from craft.engine.config import DatasetConfig, TrainConfig
from craft.errors import UserError

COLUMNS = ("input_ids", "labels", "control_classes", "attention_mask")
IGNORE_INDEX = -100


def dataset_files(spec: DatasetConfig) -> list[Path]:
    """The files a dataset glob matches, sorted; an error names the glob if nothing (readable) matches."""
    matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec.dataset_path), recursive=True))
    matches = [p for p in matches if p.is_file()]
    if not matches:
        raise UserError(f"dataset_path '{spec.dataset_path}': no file matches")
    for path in matches:
        if path.suffix.lower() not in (".txt", ".json", ".jsonl", ".parquet"):
            raise UserError(f"{path}: unsupported file type '{path.suffix}' (use .txt, .json, .jsonl or .parquet)")
    return matches


def _text_of(row, path: Path, where: str) -> str:
    """The "text" of one row; `where` names the row as the user finds it (a .jsonl line, a list item)."""
    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
        raise UserError(f"{path}: {where} has no string field \"text\"")
    return row["text"]


def read_documents(path: Path) -> list[str]:
    """The documents of one file (see the module docstring for formats); errors name the file and row."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise UserError(f"{path}: no \"text\" column (columns: {', '.join(table.column_names)})")
        docs = table.column("text").to_pylist()
        for index, doc in enumerate(docs):
            if not isinstance(doc, str):
                raise UserError(f"{path}: row {index} (counting from 0) has no string field \"text\"")
    else:
        try:
            content = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{path}: not UTF-8 text") from None
        if suffix == ".txt":
            docs = [content] if content.strip() else []
        elif suffix == ".jsonl":
            docs = []
            for index, line in enumerate(content.splitlines()):
                if line.strip():
                    try:
                        docs.append(_text_of(json.loads(line), path, f"line {index + 1}"))
                    except json.JSONDecodeError as err:
                        raise UserError(f"{path}: line {index + 1} is not valid JSON: {err.msg}") from None
        else:
            try:
                rows = json.loads(content)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None
            if not isinstance(rows, list):
                raise UserError(f"{path}: expected a JSON list of {{\"text\": ...}} objects")
            docs = [_text_of(row, path, f"list item {index + 1} (counting from 1)") for index, row in enumerate(rows)]
    docs = [d for d in docs if d]
    if not docs:
        raise UserError(f"{path}: no documents (the file is empty)")
    return docs


def _chunks(tokens: list[int], size: int, keep_tail: bool) -> list[list[int]]:
    full = len(tokens) // size * size
    out = [tokens[i:i + size] for i in range(0, full, size)]
    if keep_tail and full < len(tokens):
        out.append(tokens[full:])
    return out


def pack_dataset(documents: list[list[int]], spec: DatasetConfig, sequence_len: int, bos: int, pad: int) -> dict:
    """Pack tokenized documents (EOS already appended) into rows of `sequence_len`; returns column lists."""
    body = sequence_len - 1
    if spec.drop_tails:
        chunks = [c for doc in documents for c in _chunks(doc, body, keep_tail=False)]
    else:
        chunks = _chunks([t for doc in documents for t in doc], body, keep_tail=True)
    cap = spec.sequence_cap(sequence_len)
    if cap is not None:
        chunks = chunks[:cap]
    rows = {name: [] for name in COLUMNS}
    for chunk in chunks:
        n_pad = body - len(chunk)
        rows["input_ids"].append([bos] + chunk + [pad] * n_pad)
        rows["labels"].append([IGNORE_INDEX] + chunk + [IGNORE_INDEX] * n_pad)
        rows["control_classes"].append([spec.control_class] * sequence_len)
        rows["attention_mask"].append([1] * (1 + len(chunk)) + [0] * n_pad)
    return rows


def _special_ids(tokenizer) -> tuple[int, int, int]:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer in model_dir has no EOS token")
    if bos is None:
        bos = eos  # some families (e.g. Qwen) have no BOS; their documents start after an EOS separator
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return bos, eos, pad


def _check_vocabulary(token_lists: list[list[int]], special: tuple[int, ...], vocab_size: int | None) -> None:
    """Every token id must index a row of the model's embedding (a tokenizer of another model may exceed it)."""
    if vocab_size is None:
        return
    largest = max([*special, *(max(ids) for ids in token_lists if ids)])
    if largest >= vocab_size:
        raise UserError(f"the tokenizer in model_dir gives token id {largest}, but the model's embedding has "
                        f"vocab_size={vocab_size} rows (config.json): tokenizer and model do not belong together")


def build_rows(config: TrainConfig, tokenizer, vocab_size: int | None = None) -> dict:
    """Tokenize and pack every dataset of `config`; returns the concatenated column lists. With `vocab_size`
    (the model's embedding rows), a token id beyond it is a `UserError`."""
    bos, eos, pad = _special_ids(tokenizer)
    rows = {name: [] for name in COLUMNS}
    for spec in config.datasets:
        prefix, suffix = config.prefix_suffix(spec)
        documents = [prefix + doc + suffix for path in dataset_files(spec) for doc in read_documents(path)]
        token_lists = tokenizer(documents, add_special_tokens=False)["input_ids"]
        _check_vocabulary(token_lists, (bos, eos, pad), vocab_size)
        packed = pack_dataset([ids + [eos] for ids in token_lists], spec, config.sequence_len, bos, pad)
        if not packed["input_ids"]:
            raise UserError(f"dataset_path '{spec.dataset_path}': no complete sequence of sequence_len="
                            f"{config.sequence_len} tokens (drop_tails drops shorter documents)")
        for name in COLUMNS:
            rows[name].extend(packed[name])
    return rows


def cache_key(config: TrainConfig, model_dir: Path, vocab_size: int | None = None) -> str:
    """A hash of everything the packed rows depend on: files (path, size, mtime), tokenizer files, settings."""
    digest = hashlib.sha256()
    for spec in config.datasets:
        digest.update(spec.model_dump_json().encode())
        for path in dataset_files(spec):
            stat = path.stat()
            digest.update(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    for name in sorted(os.listdir(model_dir)):
        if name.startswith("tokenizer") or name in ("special_tokens_map.json", "vocab.json", "merges.txt"):
            digest.update(name.encode() + (model_dir / name).read_bytes())
    settings = (config.sequence_len, config.eval_fraction, config.seed, vocab_size, config.document_prefix,
                config.document_suffix)
    digest.update(repr(settings).encode())
    return digest.hexdigest()[:16]


def split_rows(rows: dict, eval_fraction: float, seed: int):
    """Shuffle with `seed` and cut off round(eval_fraction * n) rows (at least 1 when eval_fraction > 0, and at
    most n - 1: the training split is never empty)."""
    from datasets import Dataset

    dataset = Dataset.from_dict(rows).shuffle(seed=seed)
    n = len(dataset)
    n_eval = min(n - 1, max(1, round(eval_fraction * n))) if eval_fraction > 0 and n > 1 else 0
    return dataset.select(range(n_eval, n)), dataset.select(range(n_eval))


def load_or_build(config: TrainConfig, tokenizer, rank: int, vocab_size: int | None = None) -> tuple:
    """(train, eval) `datasets.Dataset`s in torch format, read from the cache that rank 0 builds if needed.

    Every rank calls this; the others wait for rank 0 and re-raise its `UserError`. The cache directory appears
    atomically (written under a temporary name, then renamed).
    """
    from datasets import disable_progress_bars, load_from_disk

    from craft.engine.distributed import run_on_zero

    disable_progress_bars()  # the run has its own progress bar

    def build() -> str:
        cache_dir = Path(config.output_dir) / "dataset_cache" / cache_key(config, Path(config.model_dir), vocab_size)
        if not cache_dir.exists():
            train, evals = split_rows(build_rows(config, tokenizer, vocab_size), config.eval_fraction, config.seed)
            tmp = cache_dir.with_name(cache_dir.name + f".tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            train.save_to_disk(str(tmp / "train"))
            if len(evals):  # an empty dataset cannot be read back by `load_from_disk`
                evals.save_to_disk(str(tmp / "eval"))
            os.replace(tmp, cache_dir)
        return str(cache_dir)

    cache_dir = Path(run_on_zero(build, rank))
    train = load_from_disk(str(cache_dir / "train"))
    evals = load_from_disk(str(cache_dir / "eval")) if (cache_dir / "eval").exists() else train.select([])
    return train.with_format("torch"), evals.with_format("torch")


class MicroBatches:
    """The micro-batches one data-parallel replica sees, in a fixed order per (seed, epoch).

    Step s of an epoch uses global micro-batches [s*G*R, (s+1)*G*R) of the epoch's permutation (G = accumulation
    steps, R = replicas); replica r takes every R-th of them starting at r. Each item is
    `((input_ids, control_classes, attention_mask), labels)`, each of shape (micro_batch_size, sequence_len) each, the format
    DeepSpeed's pipeline engine feeds to the first and the last stage. `steps` counts whole optimizer steps; a
    remainder that does not fill a step is dropped.
    """

    def __init__(self, dataset, micro_batch_size: int, accumulation: int, replicas: int, replica: int,
                 seed: int, shuffle: bool = True):
        self.dataset, self.mbs, self.accumulation = dataset, micro_batch_size, accumulation
        self.replicas, self.replica, self.seed, self.shuffle = replicas, replica, seed, shuffle
        self.steps = len(dataset) // (micro_batch_size * accumulation * replicas)

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(len(self.dataset))
        generator = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
        return torch.randperm(len(self.dataset), generator=generator)

    def iterate(self, epoch: int, start_step: int = 0):
        """Micro-batches from optimizer step `start_step` of `epoch` to the end of the epoch."""
        order = self.order(epoch)
        per_step = self.accumulation * self.replicas
        for global_index in range(start_step * per_step, self.steps * per_step):
            if global_index % self.replicas != self.replica:
                continue
            rows = self.dataset[order[global_index * self.mbs:(global_index + 1) * self.mbs]]
            yield (rows["input_ids"], rows["control_classes"], rows["attention_mask"]), rows["labels"]

    def tokens_per_step(self) -> int:
        """Tokens processed by all replicas in one optimizer step."""
        return self.mbs * self.accumulation * self.replicas * len(self.dataset[0]["input_ids"])

