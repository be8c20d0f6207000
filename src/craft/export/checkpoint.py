"""Read a local Hugging Face checkpoint one tensor at a time, and write safetensors files one tensor at a time.

The export tools never hold a whole model in memory. `BaseCheckpoint` knows which shard holds which tensor (from
`model.safetensors.index.json`, or the single `model.safetensors`) and reads single tensors through
`safetensors.safe_open`. `write_safetensors` streams tensors to disk: `safetensors.torch.save_file` first turns
every tensor of a file into a `bytes` copy, which would double the peak memory of a shard-by-shard merge.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import struct
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from craft.adapters.families import FAMILIES, FamilyFacts
from craft.errors import UserError, first_line, require_directory

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# safetensors dtype strings <-> torch dtypes (the subset a causal LM checkpoint holds).
_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


BASE_RECORD = "base_model.json"


@contextlib.contextmanager
def safetensors_file(path: Path):
    """`safe_open(path)` whose failures — missing, truncated or garbage file, damaged tensor data — are one-line
    `UserError`s naming the file (safetensors raises its own error type, OSError or ValueError)."""
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as err:
        raise UserError(f"{path}: not a readable safetensors file ({first_line(err)})") from None
    with handle:
        try:
            yield handle
        except UserError:
            raise
        except Exception as err:
            raise UserError(f"{path}: damaged safetensors data ({first_line(err)})") from None


def config_sha256(model_dir: Path) -> str:
    return hashlib.sha256((Path(model_dir) / "config.json").read_bytes()).hexdigest()


def base_identity(model_dir: Path, model_type: str) -> dict:
    """What identifies a base model wherever it lies: its model_type and the sha256 of its config.json."""
    return {"model_type": model_type, "config_sha256": config_sha256(model_dir)}


def write_base_record(directory: Path, model_dir: Path, model_type: str) -> None:
    """Record in `directory/base_model.json` which base an adapter was trained on: absolute path, model_type and
    the sha256 of its config.json, so the tools find the base from any working directory and refuse another
    architecture."""
    record = {"base_model_name_or_path": str(Path(model_dir).resolve()), **base_identity(model_dir, model_type)}
    (Path(directory) / BASE_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def read_json(path: Path, what: str) -> dict:
    """Parse a JSON file; a missing or malformed file is a `UserError` naming it and `what` it should be."""
    if not path.is_file():
        raise UserError(f"{path} not found: {what}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object: {what}")
    return data


@dataclass
class BaseCheckpoint:
    """A local HF model directory with safetensors weights, opened lazily.

    `weight_map` maps every tensor name (e.g. `model.layers.0.self_attn.o_proj.weight`) to its shard file name;
    `config` is the parsed `config.json`; `family` the per-family facts for its `model_type`.
    """

    path: Path
    config: dict
    weight_map: dict[str, str]
    family: FamilyFacts

    @classmethod
    def open(cls, path: str | Path) -> BaseCheckpoint:
        path = require_directory(path, "base model directory")
        config = read_json(path / "config.json", "a base model directory needs its config.json")
        model_type = config.get("model_type")
        if model_type not in FAMILIES:
            raise UserError(f"{path / 'config.json'}: model_type {model_type!r} is not supported; "
                            f"supported families: {', '.join(FAMILIES)}")
        if (path / INDEX_FILE).is_file():
            weight_map = read_json(path / INDEX_FILE, "the shard index").get("weight_map")
            if not isinstance(weight_map, dict):
                raise UserError(f"{path / INDEX_FILE}: no weight_map")
            for shard in sorted(set(weight_map.values())):
                if not (path / shard).is_file():
                    raise UserError(f"{path / INDEX_FILE} names the shard {shard}, which is missing")
        elif (path / SINGLE_FILE).is_file():
            with safetensors_file(path / SINGLE_FILE) as handle:
                weight_map = {name: SINGLE_FILE for name in handle.keys()}
        else:
            raise UserError(f"{path} has no {SINGLE_FILE} or {INDEX_FILE}; only safetensors checkpoints are supported")
        return cls(path, config, weight_map, FAMILIES[model_type])

    @property
    def shards(self) -> list[str]:
        """Shard file names in a stable order."""
        return sorted(set(self.weight_map.values()))

    def locate(self, name: str) -> list[Piece]:
        """Where the tensor `name` (as the model names it in memory) lives on disk.

        Usually one `Piece(name)`. Mixtral checkpoints keep the legacy per-expert layout on disk (transformers
        saves it that way too) while the model fuses experts in memory: `mlp.experts.down_proj` `(E, hidden, inter)`
        is stacked from `block_sparse_moe.experts.{e}.w2.weight`, and `mlp.experts.gate_up_proj` `(E, 2·inter,
        hidden)` from `w1` (rows `[0, inter)`) and `w3` (rows `[inter, 2·inter)`).
        """
        if name in self.weight_map:
            return [Piece(name)]
        fused = re.fullmatch(r"(model\.layers\.\d+)\.mlp\.experts\.(down_proj|gate_up_proj)", name)
        if fused and self.family.name == "mixtral":
            stem, experts = f"{fused.group(1)}.block_sparse_moe.experts", int(self.config["num_local_experts"])
            inter = int(self.config["intermediate_size"])
            if fused.group(2) == "down_proj":
                pieces = [Piece(f"{stem}.{e}.w2.weight", e) for e in range(experts)]
            else:
                pieces = [Piece(f"{stem}.{e}.{w}.weight", e, (start, start + inter))
                          for e in range(experts) for w, start in (("w1", 0), ("w3", inter))]
            if all(piece.key in self.weight_map for piece in pieces):
                return pieces
        legacy = name.replace(".mlp.", ".block_sparse_moe.")
        if self.family.name == "mixtral" and legacy in self.weight_map:
            return [Piece(legacy)]
        raise UserError(f"tensor {name!r} is not in the base model at {self.path} (adapter made for another model?)")

    def has(self, name: str) -> bool:
        try:
            self.locate(name)
        except UserError:
            return False
        return True

    def check_adapter(self, adapter_dir: Path, adapter_config: dict) -> None:
        """Refuse an adapter trained on another architecture: its recorded model_type (a Control Adapter's config,
        `base_model.json` of a `craft train` output, or the config of the base it names) must be this base's;
        a Control Adapter's hidden size and layer count must match too. A different config.json of the same
        architecture (sha256 recorded at training) is only a warning."""
        adapter_dir = Path(adapter_dir)
        record = {}
        if (adapter_dir / BASE_RECORD).is_file():
            record = read_json(adapter_dir / BASE_RECORD, "the adapter's base record")
        trained_on = adapter_config.get("model_type") or record.get("model_type")
        named_base = Path(str(adapter_config.get("base_model_name_or_path") or ""))
        if trained_on is None and str(named_base) and (named_base / "config.json").is_file():
            trained_on = read_json(named_base / "config.json", "the adapter's base config").get("model_type")
        actual = self.config.get("model_type")
        if trained_on is not None and trained_on != actual:
            raise UserError(f"{adapter_dir} was trained on a {trained_on} model, but the base {self.path} is "
                            f"{actual} (model_type in config.json); use the base it was trained on")
        for key in ("hidden_size", "num_hidden_layers"):
            if key in adapter_config and adapter_config[key] != self.config.get(key):
                raise UserError(f"{adapter_dir} was trained on a model with {key}={adapter_config[key]}, but the "
                                f"base {self.path} has {key}={self.config.get(key)}")
        if record.get("config_sha256") not in (None, config_sha256(self.path)):
            print(f"craft: warning: {self.path / 'config.json'} differs from the config of the base {adapter_dir} "
                  f"was trained on ({record.get('base_model_name_or_path')})", file=sys.stderr)

    def _read(self, key: str) -> torch.Tensor:
        with safetensors_file(self.path / self.weight_map[key]) as handle:
            return handle.get_tensor(key)

    def get_tensor(self, name: str) -> torch.Tensor:
        """One tensor by its in-memory name, read without loading the rest of its shard (fused experts are
        assembled from their per-expert pieces)."""
        pieces = self.locate(name)
        if len(pieces) == 1 and pieces[0].expert is None:
            return self._read(pieces[0].key)
        parts = {}
        for piece in pieces:
            parts.setdefault(piece.expert, []).append(self._read(piece.key))
        return torch.stack([torch.cat(parts[e], dim=0) for e in sorted(parts)])

    def projection_key(self, layer: int, projection: str) -> str:
        """The in-memory tensor name of `projection` (e.g. `self_attn.o_proj`) in decoder layer `layer`.

        Linear layers store `<module>.weight`; fused expert parameters (Mixtral `mlp.experts.down_proj`) are named
        by the parameter itself.
        """
        stem = f"model.layers.{layer}.{projection}"
        for name in (f"{stem}.weight", stem):
            if self.has(name):
                return name
        raise UserError(f"the base model at {self.path} has no tensor {stem}.weight or {stem} "
                        f"(layer {layer} out of range, or not a {self.family.name} model?)")


@dataclass(frozen=True)
class Piece:
    """A stored tensor `key` holding (part of) an in-memory tensor: expert `expert` of a fused expert parameter
    (None: the whole tensor), rows `[rows[0], rows[1])` of that expert's matrix (None: all rows)."""

    key: str
    expert: int | None = None
    rows: tuple[int, int] | None = None


def write_safetensors(path: Path, entries: Iterable[StoredTensor | tuple[str, torch.dtype, list[int]]],
                      produce: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file whose tensors are produced one at a time by `produce(name)`.

    The format is an 8-byte little-endian header length, a JSON header mapping each name to its dtype, shape and
    `[begin, end)` byte offsets in the data section, then the raw little-endian data. Shapes and dtypes must be
    known up front (`entries`), and `produce(name)` must return exactly that shape and dtype.
    """
    entries = [(e.name, e.dtype, e.shape) if isinstance(e, StoredTensor) else e for e in entries]
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape in entries:
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # keep the data section 8-byte aligned
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(header_bytes)))
        out.write(header_bytes)
        for name, dtype, shape in entries:
            tensor = produce(name)
            if tensor.dtype != dtype or list(tensor.shape) != list(shape):
                raise RuntimeError(f"{name}: produced {tensor.dtype} {list(tensor.shape)}, declared {dtype} {shape}")
            out.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
            del tensor  # free it before the next one is produced: at most one tensor alive at a time


@dataclass(frozen=True)
class StoredTensor:
    """One tensor's entry in a safetensors header: name, dtype, shape and absolute byte range in the file."""

    name: str
    dtype: torch.dtype
    shape: list[int]
    start: int
    end: int


def shard_entries(path: Path) -> tuple[list[StoredTensor], dict[str, str] | None]:
    """Every tensor of a safetensors file, in file order, and the file's metadata."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > path.stat().st_size:
                raise ValueError(f"header of {length} bytes in a file of {path.stat().st_size}")
            header = json.loads(handle.read(length))
        metadata = header.pop("__metadata__", None)
        by_name = {dtype_name: dtype for dtype, dtype_name in _DTYPE_NAMES.items()}
        ordered = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
        return [StoredTensor(name, by_name[info["dtype"]], info["shape"], 8 + length + info["data_offsets"][0],
                             8 + length + info["data_offsets"][1]) for name, info in ordered], metadata
    except (OSError, struct.error, ValueError, KeyError, TypeError, AttributeError) as err:
        raise UserError(f"{path}: not a readable safetensors file ({first_line(err)})") from None


def read_stored(handle, entry: StoredTensor) -> torch.Tensor:
    """Read one tensor from an open safetensors file with plain reads straight into a new tensor's memory.

    Unlike `safe_open` (a memory map), this leaves no mapped pages of the file resident in the process, so a
    shard-by-shard merge holds only the tensors it is working on.
    """
    tensor = torch.empty(entry.shape, dtype=entry.dtype)
    handle.seek(entry.start)
    view = tensor.reshape(-1).view(torch.uint8).numpy()
    if handle.readinto(view) != entry.end - entry.start:
        raise UserError(f"{handle.name}: truncated data for tensor {entry.name}")
    return tensor
