"""The TOML schema of `craft train`: every key of the qlora-pipe-lite README, its defaults, and clear errors.

A config file is parsed with `tomllib`, optionally patched with `--set key=value` overrides, and validated by
`TrainConfig` (pydantic v2, `extra="forbid"`). Every mistake a user can make becomes a one-line
`craft.errors.UserError` that names the file, the key (and for unknown keys the nearest valid one, or for keys
of qlora-pipe / older qlora-pipe-lite configs the key that does the same here), or the TOML line at fault. All
the key errors of a file are reported together, `; `-separated, in that one line.

Keys of the current qlora-pipe-lite configs are accepted with their meaning: `evals_per_epoch` (top level: evals
evenly spaced within each epoch instead of `evals_per_run` over the run), `max_tokens` (per dataset: a cap on its
tokens, taken as whole packed sequences, i.e. floor(max_tokens / sequence_len) of them), `document_prefix` /
`document_suffix` (top level, or per dataset where it overrides: text put before / after every document before it
is tokenized).
"""

from __future__ import annotations

import difflib
import math
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from craft.engine.loss import DEFAULT_CHUNK_SIZE
from craft.errors import UserError


class DatasetConfig(BaseModel):
    """One `[[datasets]]` table: files matched by a glob, all carrying the same control class."""

    model_config = ConfigDict(extra="forbid", strict=True)

    dataset_path: str
    control_class: Literal[-1, 0, 1] = 1
    max_sequences: int | None = Field(default=None, gt=0)
    max_tokens: int | None = Field(default=None, gt=0)
    drop_tails: bool = False
    document_prefix: str | None = None
    document_suffix: str | None = None

    def sequence_cap(self, sequence_len: int) -> int | None:
        """How many packed sequences to keep at most: `max_sequences` and floor(`max_tokens` / sequence_len)."""
        caps = [c for c in (self.max_sequences, self.max_tokens and self.max_tokens // sequence_len) if c is not None]
        return min(caps) if caps else None


class TrainConfig(BaseModel):
    """All keys of a `craft train` TOML file. Defaults follow the qlora-pipe-lite README.

    Keys beyond the seed: the Control Adapter options (`control_adapter_*`, `control_inverse`,
    `control_neumann_order`), `lr_scheduler`/`warmup_steps`, `seed`, `model_dtype`, `micro_batch_size`, and
    `max_steps` (a cap on optimizer steps, for smoke runs), and the memory keys `activation_checkpointing`
    (true: every decoder layer recomputed in backward; "offload": its saved input also kept in CPU memory;
    false: all activations kept) and `chunk_size` (tokens per chunk of the loss, whose logits are recomputed in
    backward; 0 = the full logits at once); see `craft.engine.pipeline` and `craft.engine.loss`.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    model_dir: str
    output_dir: str
    use_control_adapters: bool = False
    full_fine_tune: bool = False
    load_in_4bit: bool = False
    lora_rank: int | None = Field(default=None, gt=0)
    lora_alpha: float | None = Field(default=None, gt=0)  # None -> sqrt(rank) (rsLoRA)
    lora_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    lora_weight_decay: float = Field(default=0.0, ge=0.0)
    lora_weight_dtype: Literal["float32", "bfloat16"] = "float32"
    target_modules: list[str] | None = None
    layers_to_transform: str | None = None
    lr: float = Field(gt=0)
    epochs: int = Field(default=1, gt=0)
    beta1: float = Field(default=0.9, ge=0.0, lt=1.0)
    beta2: float = Field(default=0.99, ge=0.0, lt=1.0)
    eps: float = Field(default=1e-6, gt=0)
    sequence_len: int = Field(gt=1)
    gradient_accumulation_steps: int = Field(default=1, gt=0)
    eval_gradient_accumulation_steps: int | None = Field(default=None, gt=0)
    micro_batch_size: int = Field(default=1, gt=0)
    pipeline_stages: int = Field(default=1, gt=0)
    use_column_major_topology: bool = False
    checkpoint_interval_hours: float = Field(default=1.0, gt=0)
    max_checkpoints: int = Field(default=3, gt=0)
    eval_fraction: float = Field(default=0.01, ge=0.0, lt=1.0)
    evals_per_run: int = Field(default=11, ge=0)
    evals_per_epoch: int | None = Field(default=None, ge=0)
    document_prefix: str = ""
    document_suffix: str = ""
    control_class0_lambda: float = Field(default=0.0, ge=0.0)
    control_adapter_target: Literal["sublayers", "block"] = "sublayers"
    control_adapter_type: Literal["lowrank", "symmetric"] = "lowrank"
    control_inverse: Literal["exact", "neumann"] = "exact"
    control_neumann_order: int = Field(default=4, gt=0)
    control_adapter_gamma: float = Field(default=0.1, ge=0.0)
    lr_scheduler: Literal["seed", "constant", "cosine"] = "seed"
    warmup_steps: int | None = Field(default=None, ge=0)
    seed: int = 42
    model_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    max_steps: int | None = Field(default=None, gt=0)
    activation_checkpointing: bool | Literal["offload"] = True
    chunk_size: int = Field(default=DEFAULT_CHUNK_SIZE, ge=0)
    datasets: list[DatasetConfig] = Field(min_length=1)

    @field_validator("lr", "beta1", "beta2", "eps", "lora_alpha", "lora_dropout", "lora_weight_decay",
                     "checkpoint_interval_hours", "eval_fraction", "control_class0_lambda",
                     "control_adapter_gamma", mode="before")
    @classmethod
    def _int_is_a_float(cls, value):
        # TOML writes `lr = 1` as an integer; a float key accepts it (but not a string or a bool).
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("activation_checkpointing", mode="before")
    @classmethod
    def _checkpointing_mode(cls, value):
        if isinstance(value, bool) or value == "offload":
            return value
        raise ValueError(f'expected true, false or "offload", got {value!r}')

    @field_validator("layers_to_transform")
    @classmethod
    def _layer_range(cls, value):
        if value is not None:
            parse_layer_range(value)
        return value

    @model_validator(mode="after")
    def _consistent(self):
        """Every cross-key conflict, all of them in one `; `-separated message (like the per-key errors)."""
        conflicts = []
        if self.full_fine_tune and self.use_control_adapters:
            conflicts.append("full_fine_tune and use_control_adapters cannot both be true")
        if self.full_fine_tune and self.lora_weight_decay > 0:
            conflicts.append(
                "lora_weight_decay is not supported with full_fine_tune: weight decay on bfloat16 weights suffers "
                "catastrophic cancellation, and pulling pretrained weights toward zero is a poor inductive bias")
        if self.full_fine_tune and self.load_in_4bit:
            conflicts.append("load_in_4bit cannot be combined with full_fine_tune (4-bit weights are frozen)")
        if not self.full_fine_tune and self.lora_rank is None:
            conflicts.append("lora_rank is required for LoRA and Control Adapter training")
        if self.use_control_adapters and self.target_modules is not None:
            conflicts.append("target_modules is not available with use_control_adapters (they act per layer)")
        if self.evals_per_epoch is not None and "evals_per_run" in self.model_fields_set:
            conflicts.append("evals_per_run and evals_per_epoch cannot both be given (choose one eval schedule)")
        for index, spec in enumerate(self.datasets):
            if spec.max_tokens is not None and spec.max_tokens < self.sequence_len:
                conflicts.append(f"datasets.{index}.max_tokens={spec.max_tokens} is less than one sequence "
                                 f"(sequence_len={self.sequence_len})")
        if conflicts:
            raise ValueError("; ".join(conflicts))
        return self

    # Derived values -----------------------------------------------------------------------------------------
    @property
    def alpha(self) -> float:
        """lora_alpha, defaulting to sqrt(rank) (rsLoRA: scale = alpha / rank = 1 / sqrt(rank))."""
        return self.lora_alpha if self.lora_alpha is not None else math.sqrt(self.lora_rank)

    def prefix_suffix(self, spec: DatasetConfig) -> tuple[str, str]:
        """The text put around each document of `spec`: its own document_prefix/suffix, else the top-level one."""
        prefix = spec.document_prefix if spec.document_prefix is not None else self.document_prefix
        suffix = spec.document_suffix if spec.document_suffix is not None else self.document_suffix
        return prefix, suffix

    @property
    def eval_accumulation_steps(self) -> int:
        return self.eval_gradient_accumulation_steps or self.gradient_accumulation_steps

    def layer_indices(self, num_layers: int) -> list[int] | None:
        """The decoder layers to adapt (None = all); `'a:b'` is inclusive at both ends."""
        if self.layers_to_transform is None:
            return None
        first, last = parse_layer_range(self.layers_to_transform)
        if last >= num_layers:
            raise UserError(f"layers_to_transform '{self.layers_to_transform}': the model has only {num_layers} "
                            f"layers (0:{num_layers - 1})")
        return list(range(first, last + 1))


def parse_layer_range(text: str) -> tuple[int, int]:
    """`'a:b'` -> (a, b) with 0 <= a <= b, both inclusive."""
    parts = text.split(":")
    try:
        first, last = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"expected 'first:last' (inclusive), e.g. '0:29', got {text!r}") from None
    if not 0 <= first <= last:
        raise ValueError(f"expected 0 <= first <= last, got {text!r}")
    return first, last


# Keys of qlora-pipe (and older forks) with no key of that name here: the key that does the same job.
EQUIVALENT_KEYS = {
    "micro_batch_size_per_gpu": "micro_batch_size",
    "eval_micro_batch_size_per_gpu": "micro_batch_size",
    "eval_steps": "evals_per_run or evals_per_epoch",
    "eval_before_first_step": "evals_per_run (its schedule includes the start and the end)",
    "eval_after_last_step": "evals_per_run (its schedule includes the start and the end)",
    "save_steps": "checkpoint_interval_hours",
    "checkpoint_every_n_minutes": "checkpoint_interval_hours",
    "logging_steps": "nothing (every step is logged)",
    "optimizer": "the top-level keys lr, beta1, beta2 and eps",
    "dataset_type": "nothing (the file extension selects the format)",
    "eval_size": "eval_fraction",
    "max_steps_per_epoch": "max_steps",
    "max_tokens": "max_tokens inside a [[datasets]] table (a cap on that dataset's tokens), or max_steps",
}

_TYPE_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false", "string": "a string",
               "list": "a list", "literal": "one of", "dict": "a table", "model": "a table"}


def _describe(error: dict) -> str:
    """One line for one pydantic error: the dotted key path and what was expected."""
    loc = error["loc"]
    # Drop pydantic's internal tags (e.g. 'function-after[...]') that are not keys.
    path = [str(p) for p in loc if not (isinstance(p, str) and "[" in p)]
    key = ".".join(path).replace(".datasets.", "datasets.")
    kind = error["type"]
    if kind == "extra_forbidden":
        if path[-1] in EQUIVALENT_KEYS:
            return f"unknown key '{key}' (a qlora-pipe key); use {EQUIVALENT_KEYS[path[-1]]}"
        near = _nearest_key(path)
        hint = f"; did you mean '{near}'?" if near else f"; valid keys: {', '.join(_valid_keys(path))}"
        return f"unknown key '{key}'{hint}"
    if kind == "missing":
        return f"missing required key '{key}'"
    message = error["msg"]
    if kind.endswith("_type") or kind == "literal_error":
        return f"key '{key}': {message[0].lower() + message[1:]} (got {error.get('input')!r})"
    if kind == "value_error" and not key:
        return message.removeprefix("Value error, ")
    return f"key '{key}': {message.removeprefix('Value error, ')}"


def _valid_keys(path: list[str]) -> list[str]:
    return list(DatasetConfig.model_fields if "datasets" in path[:-1] else TrainConfig.model_fields)


def _nearest_key(path: list[str]) -> str | None:
    near = difflib.get_close_matches(path[-1], _valid_keys(path), n=1, cutoff=0.5)
    return near[0] if near else None


def describe_errors(errors: list[dict]) -> str:
    """All pydantic errors in one line. A required key reported missing next to an unknown key that is its
    misspelling (`dataset_pth`) is reported once, as the unknown key with its did-you-mean."""
    misspelt = set()
    for error in errors:
        if error["type"] == "extra_forbidden":
            path = [str(p) for p in error["loc"]]
            near = _nearest_key(path)
            if near is not None:
                misspelt.add((*path[:-1], near))
    kept = [e for e in errors if not (e["type"] == "missing" and tuple(str(p) for p in e["loc"]) in misspelt)]
    return "; ".join(_describe(error) for error in kept)


def _parse_override(text: str):
    """`key=value` from the command line; the value is read as a TOML value, else as a plain string."""
    if "=" not in text:
        raise UserError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Read, patch and validate a TOML config; a `UserError` names the file and the key or line at fault.

    `overrides` are `key=value` strings (`--set`), applied to top-level keys before validation, so a user (or a
    test) can point `model_dir` or `output_dir` elsewhere without editing the file.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{path}: malformed TOML: {err}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    for item in overrides:
        key, value = _parse_override(item)
        raw[key] = value
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as err:
        raise UserError(f"{path}: {describe_errors(err.errors())}") from None
