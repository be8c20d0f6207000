"""CRAFT presets and automatic configuration: `config_from_preset`, `auto_configure` and `auto_config`.

Both build an ordinary CRAFT config (``CRAFTSFTConfig``, ``CRAFTDPOConfig``, ...) and are also available as
classmethods, ``CRAFTSFTConfig.from_preset(name, output_dir=...)`` and ``CRAFTSFTConfig.auto(output_dir, model,
sft_dataset, ...)``. Keyword overrides always win over what the preset or the automatic choice says.
`auto_configure` returns the automatic settings as a dict (contrastive-ft 0.4.3's function); `get_preset` a copy
of one preset.

Presets — contrastive-ft 0.4.3's values (every key not listed keeps the config default):

* ``minimal`` — mostly SFT (alpha 0.8), no balancing, fixed temperature, no GradCache, fixed beta with
  oversampling: the cheapest way to add CRAFT to an SFT run.
* ``balanced`` — alpha 0.6, ``loss_scale`` balancing (momentum 0.99), learnable temperature, beta from the
  loaders' lengths (``auto`` / ``auto_beta``), the final-norm hook. The recommended starting point.
* ``memory_efficient`` — ``balanced`` plus GradCache with chunks of 4 sequences and a 128-dim head.
* ``large_batch`` — alpha 0.5, GradCache (chunks of 8), a 65536-entry MoCo queue, ``loss_scale`` balancing,
  learnable temperature: many negatives per anchor.
* ``aggressive`` — a strong contrastive push: alpha 0.4, ``gradnorm`` balancing (asymmetry 1.5), learnable
  temperature, GradCache and a 32768-entry queue.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os

import torch

from craft.errors import UserError
from craft.hooks import text_config

logger = logging.getLogger(__name__)

_AUTO_BETA = {"craft_beta_mode": "auto", "craft_length_strategy": "auto_beta"}
_FIXED_SCHEDULE = {"craft_beta_mode": "fixed", "craft_length_strategy": "oversample"}
PRESETS: dict[str, dict] = {
    "minimal": {
        "craft_alpha": 0.8, "craft_gradient_balancing": "none", "craft_learnable_temperature": False,
        "craft_use_gradcache": False, "craft_beta_mode": "fixed", "craft_length_strategy": "oversample",
    },
    "balanced": {
        "craft_alpha": 0.6, "craft_gradient_balancing": "loss_scale", "craft_loss_scale_momentum": 0.99,
        "craft_learnable_temperature": True, "craft_use_hidden_state_hook": True, **_AUTO_BETA,
    },
    "memory_efficient": {
        "craft_alpha": 0.6, "craft_use_gradcache": True, "craft_gradcache_chunk_size": 4,
        "craft_use_hidden_state_hook": True, "craft_projection_dim": 128, "craft_gradient_balancing": "loss_scale",
        "craft_learnable_temperature": True, **_AUTO_BETA,
    },
    "large_batch": {
        "craft_alpha": 0.5, "craft_use_gradcache": True, "craft_gradcache_chunk_size": 8,
        "craft_negative_strategy": "queue", "craft_negative_queue_size": 65536,
        "craft_gradient_balancing": "loss_scale", "craft_learnable_temperature": True,
        "craft_use_hidden_state_hook": True, **_AUTO_BETA,
    },
    "aggressive": {
        "craft_alpha": 0.4, "craft_gradient_balancing": "gradnorm", "craft_gradnorm_alpha": 1.5,
        "craft_learnable_temperature": True, "craft_use_gradcache": True, "craft_negative_strategy": "queue",
        "craft_negative_queue_size": 32768, **_AUTO_BETA,
    },
}
CRAFT_PRESETS = PRESETS  # contrastive-ft 0.4.3's name


def get_preset(name: str) -> dict:
    """A copy of preset ``name`` (a `UserError`, i.e. a ValueError, for an unknown name)."""
    if name not in PRESETS:
        raise UserError(f"Unknown preset {name!r}; available presets: {', '.join(PRESETS)}")
    return dict(PRESETS[name])

# auto_configure rules
MAX_PROJECTION_DIM = 256
MIN_PROJECTION_DIM = 64
BETA_RANGE = (0.3, 0.8)  # SFT fraction: neither objective is starved whatever the dataset sizes
# Without a model to estimate activation memory from: GradCache chunk size by available memory (GiB).
MEMORY_THRESHOLDS = ((16, 2), (24, 4))
QUEUE_MIN_CONTRASTIVE_ROWS = 10_000
MAX_QUEUE_SIZE = 65_536
MEMORY_SAFETY = 0.8  # plan with 80 % of the available memory
DEFAULT_SEQUENCE_LENGTH = 512
OPTIMIZER_BYTES_PER_TRAINABLE = 12  # fp32 gradient (4) + Adam's two moments (8)


def _build(config_cls, output_dir, values: dict):
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(f"{config_cls.__name__} has no setting {unknown[0]!r}"
                        f"{' (and ' + ', '.join(map(repr, unknown[1:])) + ')' if len(unknown) > 1 else ''}")
    return config_cls(output_dir=output_dir, **values)


def config_from_preset(config_cls, name: str, output_dir: str, **overrides):
    """``config_cls(output_dir=output_dir, **PRESETS[name], **overrides)`` (overrides win).

    For the preference / RL configs (``config_cls.craft_fixed_schedule``) the preset's automatic schedule
    (``craft_beta_mode="auto"``, ``craft_length_strategy="auto_beta"``) becomes ``"fixed"`` / ``"oversample"``:
    their trainers draw contrastive micro-batches at the fixed rate ``craft_beta`` beside the host's loader and
    refuse the automatic keys; the preset's other settings apply as they are. Overrides still win (and an explicit
    automatic key is refused by the trainer). An unknown preset or setting is a `UserError` naming it.
    """
    values = get_preset(name)
    if getattr(config_cls, "craft_fixed_schedule", False):
        fixed = {key: value for key, value in _FIXED_SCHEDULE.items() if values.get(key, value) != value}
        if fixed:
            logger.info("preset %r on %s: %s (the trainer schedules contrastive micro-batches at the fixed rate "
                        "craft_beta)", name, config_cls.__name__,
                        ", ".join(f"{key}={value!r}" for key, value in fixed.items()))
        values.update(fixed)
    return _build(config_cls, output_dir, {**values, **overrides})


# ---------------------------------------------------------------------------------------------- auto


def detect_available_memory_gb() -> float:
    """Free memory in GiB: the current CUDA device's free memory, else MemAvailable of /proc/meminfo, else psutil."""
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return free / 2**30
    if os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / 2**30
    try:
        import psutil
    except ImportError:
        raise UserError("cannot detect the available memory (no CUDA, no /proc/meminfo, no psutil); pass "
                        "available_memory_gb=...") from None
    return psutil.virtual_memory().available / 2**30


def estimate_memory_bytes(model, sequence_length: int) -> tuple[int, int]:
    """(static bytes, activation bytes per training sequence) for ``model``.

    static = Σ params · bytes-per-element + trainable params · 12 (fp32 gradient + Adam moments).
    per sequence (Korthikanti et al. 2022, per layer, without recomputation, for 2-byte activations):
    ``L · (34·T·H + 5·heads·T²)`` bytes, scaled by the model's element size / 2.
    """
    params = list(model.parameters())
    static = sum(p.numel() * p.element_size() for p in params)
    static += OPTIMIZER_BYTES_PER_TRAINABLE * sum(p.numel() for p in params if p.requires_grad)
    config = text_config(model)
    hidden, layers = int(config.hidden_size), int(config.num_hidden_layers)
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    element = params[0].element_size() if params else 2
    t = int(sequence_length)
    per_sequence = layers * (34 * t * hidden + 5 * heads * t * t) * element // 2
    return static, per_sequence


def _rows(dataset) -> int | None:
    if dataset is None:
        return None
    try:
        return len(dataset)
    except TypeError:
        return None


def _max_length(*datasets, sample: int = 256) -> int | None:
    """The longest ``input_ids`` / ``input_ids_tgt`` among the first ``sample`` rows of the datasets."""
    longest = None
    for dataset in datasets:
        if dataset is None or _rows(dataset) is None:
            continue
        for index in range(min(sample, len(dataset))):
            try:
                row = dataset[index]
            except (TypeError, KeyError, IndexError, NotImplementedError):  # sized but not indexable
                break
            for key in ("input_ids", "input_ids_tgt"):
                if isinstance(row, dict) and key in row and row[key] is not None:
                    longest = max(longest or 0, len(row[key]))
    return longest


def _field_default(config_cls, name: str):
    for f in dataclasses.fields(config_cls):
        if f.name == name:
            return f.default
    return None


def _choose(choices: dict, overrides: dict, key: str, value, reason: str) -> None:
    if key in overrides:
        logger.info("CRAFT auto: %s=%r kept from the overrides (auto would choose %r: %s)",
                    key, overrides[key], value, reason)
        return
    choices[key] = value
    logger.info("CRAFT auto: %s=%r because %s", key, value, reason)


def _power_of_two_at_most(value: float) -> int:
    return 2 ** int(math.floor(math.log2(value))) if value >= 1 else 1


def auto_configure(model=None, sft_dataset=None, contrastive_dataset=None, available_memory_gb: float | None = None,
                   *, overrides: dict | None = None, config_cls=None) -> dict:
    """CRAFT settings chosen from the model, the datasets and the memory, as a dict; starts from ``balanced``.

    * ``craft_projection_dim`` (with a model) = hidden_size // 4, within [64, 256].
    * ``craft_beta`` (with both datasets) = n_sft / (n_sft + n_con) in micro-batches (rows / batch size; the SFT
      fraction), clamped to [0.3, 0.8].
    * ``craft_use_gradcache`` / ``craft_gradcache_chunk_size``: with a model whose config names its layers, 80 % of
      ``available_memory_gb`` (detected when None: CUDA free memory, else system RAM) minus the static memory
      (`estimate_memory_bytes`) is the activation budget; if the 2·B sequences of a contrastive batch do not fit,
      GradCache is on with the largest power-of-two chunk that fits (at least 1). Without such a model but with
      ``available_memory_gb``: below 16 GiB chunks of 2 and a head of at most 128, below 24 GiB chunks of 4.
    * ``craft_negative_strategy="queue"`` for >= 10 000 contrastive rows, with a queue of the largest power of
      two <= rows / 2, at most 65 536 (smaller than half an epoch, so a row's own positive is rarely queued).

    ``overrides`` (settings the caller fixes; they are not in the result) and ``config_cls`` (for default batch
    sizes) come from `auto_config`. Every choice is logged (``logging.info``) with its reason.
    """
    overrides = dict(overrides or {})
    choices: dict = {key: value for key, value in PRESETS["balanced"].items() if key not in overrides}
    if model is not None:
        hidden = int(text_config(model).hidden_size)
        dim = min(MAX_PROJECTION_DIM, max(MIN_PROJECTION_DIM, hidden // 4))
        _choose(choices, overrides, "craft_projection_dim", dim,
                f"hidden size {hidden}: hidden/4 within [{MIN_PROJECTION_DIM}, {MAX_PROJECTION_DIM}]")

    default_batch = _field_default(config_cls, "per_device_train_batch_size") if config_cls is not None else 8
    sft_batch = overrides.get("per_device_train_batch_size", default_batch)
    con_batch = overrides.get("craft_contrastive_batch_size") or sft_batch
    n_sft, n_con = _rows(sft_dataset), _rows(contrastive_dataset)
    if n_sft and n_con:
        sft_batches, con_batches = math.ceil(n_sft / sft_batch), math.ceil(n_con / con_batch)
        raw = sft_batches / (con_batches + sft_batches)
        beta = round(min(BETA_RANGE[1], max(BETA_RANGE[0], raw)), 4)
        _choose(choices, overrides, "craft_beta", beta,
                f"{sft_batches} SFT and {con_batches} contrastive micro-batches per epoch give beta {raw:.4f} "
                f"(both loaders end together), clamped to {list(BETA_RANGE)}")
    else:
        logger.info("CRAFT auto: craft_beta left at its default: %s",
                    "no separate contrastive dataset (self-align draws its positives from the SFT batches)"
                    if contrastive_dataset is None else "a dataset has no length")

    layers = getattr(text_config(model), "num_hidden_layers", None) if model is not None else None
    if layers is not None:
        _choose_gradcache(choices, overrides, model, sft_dataset, contrastive_dataset, con_batch, available_memory_gb)
    elif available_memory_gb is not None:
        for limit, chunk in MEMORY_THRESHOLDS:
            if available_memory_gb < limit:
                reason = f"{available_memory_gb} GiB < {limit} GiB and no model config to estimate activations from"
                _choose(choices, overrides, "craft_use_gradcache", True, reason)
                _choose(choices, overrides, "craft_gradcache_chunk_size", chunk, reason)
                if limit == MEMORY_THRESHOLDS[0][0]:
                    dim = min(choices.get("craft_projection_dim", MAX_PROJECTION_DIM), 128)
                    _choose(choices, overrides, "craft_projection_dim", dim, reason)
                break

    if n_con is not None and n_con >= QUEUE_MIN_CONTRASTIVE_ROWS:
        size = min(MAX_QUEUE_SIZE, _power_of_two_at_most(n_con / 2))
        _choose(choices, overrides, "craft_negative_strategy", "queue",
                f"{n_con} contrastive rows (>= {QUEUE_MIN_CONTRASTIVE_ROWS}): past positives add negatives")
        _choose(choices, overrides, "craft_negative_queue_size", size,
                f"largest power of two <= half of the {n_con} contrastive rows, at most {MAX_QUEUE_SIZE}")
    return choices


def auto_config(config_cls, output_dir: str, model=None, sft_dataset=None, contrastive_dataset=None,
                available_memory_gb: float | None = None, **overrides):
    """``config_cls(output_dir=output_dir, **auto_configure(...), **overrides)`` (overrides win)."""
    choices = auto_configure(model, sft_dataset, contrastive_dataset, available_memory_gb, overrides=overrides,
                             config_cls=config_cls)
    return _build(config_cls, output_dir, {**choices, **overrides})


def _choose_gradcache(choices, overrides, model, sft_dataset, contrastive_dataset, con_batch, available_gb):
    if available_gb is None:
        available_gb = detect_available_memory_gb()
        logger.info("CRAFT auto: detected %.2f GiB of available memory", available_gb)
    length = _max_length(contrastive_dataset, sft_dataset) or DEFAULT_SEQUENCE_LENGTH
    static, per_sequence = estimate_memory_bytes(model, length)
    budget = MEMORY_SAFETY * available_gb * 2**30 - static
    sequences = 2 * con_batch  # anchors and positives of one contrastive micro-batch
    need = sequences * per_sequence
    if need <= budget:
        _choose(choices, overrides, "craft_use_gradcache", False,
                f"a contrastive batch ({sequences} sequences of {length} tokens) needs {need / 2**30:.3g} GiB of "
                f"activations, within the {budget / 2**30:.3g} GiB budget")
        return
    chunk = max(1, min(sequences, _power_of_two_at_most(budget / per_sequence) if budget > per_sequence else 1))
    if budget < per_sequence:
        logger.warning("CRAFT auto: even one sequence of %d tokens (%.3g GiB) exceeds the activation budget "
                       "(%.3g GiB); using chunks of 1", length, per_sequence / 2**30, budget / 2**30)
    _choose(choices, overrides, "craft_use_gradcache", True,
            f"a contrastive batch ({sequences} sequences of {length} tokens) needs {need / 2**30:.3g} GiB of "
            f"activations, more than the {budget / 2**30:.3g} GiB budget")
    _choose(choices, overrides, "craft_gradcache_chunk_size", chunk,
            f"the largest power of two of sequences ({per_sequence / 2**20:.3g} MiB each) within the budget")
