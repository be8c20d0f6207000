"""Read a local Hugging Face checkpoint one tensor at a time, and write safetensors files one tensor at a time.

The export tools never hold a whole model in memory. `BaseCheckpoint` knows which shard holds which tensor (from
`model.safetensors.index.json`, or the single `model.safetensors`) and reads single tensors through
`safetensors.safe_open`. `write_safetensors` streams tensors to disk: `safetensors.torch.save_file` first turns
every tensor of a file into a `bytes` copy, which would double the peak memory of a shard-by-shard merge.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from craft.adapters.families import FAMILIES, FamilyFacts
from craft.errors import UserError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# safetensors dtype strings <-> torch dtypes (the subset a causal LM checkpoint holds).
_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def read_json(path: Path, what: str) -> dict:
    """Parse a JSON file; a missing or malformed file is a `UserError` naming it and `what` it should be."""
    if not path.is_file():
        raise UserError(f"{path} not found: {what}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err})") from None


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
        path = Path(path)
        if not path.is_dir():
            raise UserError(f"base model directory {path} does not exist")
        config = read_json(path / "config.json", "a base model directory needs its config.json")
        model_type = config.get("model_type")
        if model_type not in FAMILIES:
            raise UserError(f"{path / 'config.json'}: model_type {model_type!r} is not supported; "
                            f"supported families: {', '.join(FAMILIES)}")
        if (path / INDEX_FILE).is_file():
            weight_map = read_json(path / INDEX_FILE, "the shard index")["weight_map"]
        elif (path / SINGLE_FILE).is_file():
            with safe_open(path / SINGLE_FILE, "pt") as handle:
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

    def _read(self, key: str) -> torch.Tensor:
        with safe_open(self.path / self.weight_map[key], "pt") as handle:
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
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    metadata = header.pop("__metadata__", None)
    by_name = {dtype_name: dtype for dtype, dtype_name in _DTYPE_NAMES.items()}
    ordered = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
    return [StoredTensor(name, by_name[info["dtype"]], info["shape"], 8 + length + info["data_offsets"][0],
                         8 + length + info["data_offsets"][1]) for name, info in ordered], metadata


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
