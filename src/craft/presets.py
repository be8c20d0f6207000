"""CRAFT presets and automatic configuration: `config_from_preset` and `auto_config`.

Both build an ordinary CRAFT config (``CRAFTSFTConfig``, ``CRAFTDPOConfig``, ...) and are also available as
classmethods, ``CRAFTSFTConfig.from_preset(name, output_dir=...)`` and ``CRAFTSFTConfig.auto(output_dir, model,
sft_dataset, ...)``. Keyword overrides always win over what the preset or the automatic choice says.

Presets (every key not listed keeps the config default):

* ``minimal`` — mostly SFT with a light contrastive signal: alpha 0.8, beta 0.25, a 128-dim head, fixed
  temperature 0.07. The cheapest way to add CRAFT to an SFT run.
* ``balanced`` — the README defaults (alpha 0.6, beta 0.5, 256-dim head, temperature 0.05) with ``loss_scale``
  balancing so neither loss dominates by its scale. The recommended starting point.
* ``memory_efficient`` — GradCache with chunks of 4 sequences, the final-norm hook, a 128-dim head: contrastive
  batches whose activations would not fit at once.
* ``large_batch`` — contrastive batches of 256 through GradCache (chunks of 16), a 16384-entry MoCo queue and a
  learnable temperature: many negatives per anchor.
* ``aggressive`` — a strong contrastive push: alpha 0.4, beta 0.6, learnable temperature, a 4096-entry queue and
  ``uncertainty`` balancing (learned task weights).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os

import torch

from craft.errors import UserError

logger = logging.getLogger(__name__)

PRESETS: dict[str, dict] = {
    "minimal": {
        "craft_alpha": 0.8, "craft_beta": 0.25, "craft_projection_dim": 128, "craft_temperature": 0.07,
        "craft_learnable_temperature": False, "craft_negative_strategy": "in_batch",
        "craft_gradient_balancing": "none", "craft_use_gradcache": False,
    },
    "balanced": {
        "craft_alpha": 0.6, "craft_beta": 0.5, "craft_projection_dim": 256, "craft_temperature": 0.05,
        "craft_learnable_temperature": False, "craft_negative_strategy": "in_batch",
        "craft_gradient_balancing": "loss_scale", "craft_use_gradcache": False,
    },
    "memory_efficient": {
        "craft_alpha": 0.6, "craft_beta": 0.5, "craft_projection_dim": 128, "craft_temperature": 0.05,
        "craft_use_gradcache": True, "craft_gradcache_chunk_size": 4, "craft_use_hidden_state_hook": True,
        "craft_negative_strategy": "in_batch", "craft_gradient_balancing": "none",
    },
    "large_batch": {
        "craft_alpha": 0.6, "craft_beta": 0.5, "craft_projection_dim": 256, "craft_temperature": 0.05,
        "craft_learnable_temperature": True, "craft_contrastive_batch_size": 256, "craft_use_gradcache": True,
        "craft_gradcache_chunk_size": 16, "craft_negative_strategy": "queue", "craft_negative_queue_size": 16384,
        "craft_gradient_balancing": "none",
    },
    "aggressive": {
        "craft_alpha": 0.4, "craft_beta": 0.6, "craft_projection_dim": 256, "craft_temperature": 0.05,
        "craft_learnable_temperature": True, "craft_negative_strategy": "queue", "craft_negative_queue_size": 4096,
        "craft_gradient_balancing": "uncertainty", "craft_use_gradcache": False,
    },
}

# auto_config rules
MAX_PROJECTION_DIM = 256
MIN_PROJECTION_DIM = 16
BETA_RANGE = (0.1, 0.9)  # neither objective is starved whatever the dataset sizes
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

    An unknown preset or setting is a `UserError` naming it.
    """
    if name not in PRESETS:
        raise UserError(f"unknown CRAFT preset {name!r}; available presets: {', '.join(PRESETS)}")
    return _build(config_cls, output_dir, {**PRESETS[name], **overrides})


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


def _text_config(model):
    from craft.hooks import unwrap_model

    config = unwrap_model(model).config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def estimate_memory_bytes(model, sequence_length: int) -> tuple[int, int]:
    """(static bytes, activation bytes per training sequence) for ``model``.

    static = Σ params · bytes-per-element + trainable params · 12 (fp32 gradient + Adam moments).
    per sequence (Korthikanti et al. 2022, per layer, without recomputation, for 2-byte activations):
    ``L · (34·T·H + 5·heads·T²)`` bytes, scaled by the model's element size / 2.
    """
    params = list(model.parameters())
    static = sum(p.numel() * p.element_size() for p in params)
    static += OPTIMIZER_BYTES_PER_TRAINABLE * sum(p.numel() for p in params if p.requires_grad)
    config = _text_config(model)
    hidden, layers = int(config.hidden_size), int(config.num_hidden_layers)
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    element = params[0].element_size() if params else 2
    t = int(sequence_length)
    per_sequence = layers * (34 * t * hidden + 5 * heads * t * t) * element // 2
    return static, per_sequence


def _rows(dataset) -> int | None:
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
            row = dataset[index]
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


def auto_config(config_cls, output_dir: str, model, sft_dataset, contrastive_dataset=None,
                available_memory_gb: float | None = None, **overrides):
    """A config whose CRAFT settings are derived from the model, the datasets and the memory; overrides win.

    * ``craft_projection_dim`` = the largest power of two <= hidden_size / 2, within [16, 256].
    * ``craft_beta`` (with a contrastive dataset) = n_con / (n_con + n_sft) in micro-batches (rows / batch
      size), clamped to [0.1, 0.9]: both loaders end together.
    * ``craft_use_gradcache`` / ``craft_gradcache_chunk_size``: with ``available_memory_gb`` (detected when
      None: CUDA free memory, else system RAM), 80 % of it minus the static memory (`estimate_memory_bytes`) is
      the activation budget; if the 2·B sequences of a contrastive batch do not fit, GradCache is on with the
      largest power-of-two chunk that fits (at least 1).
    * ``craft_negative_strategy="queue"`` for >= 10 000 contrastive rows, with a queue of the largest power of
      two <= rows / 2, at most 65 536 (smaller than half an epoch, so a row's own positive is rarely queued).

    Every choice is logged (``logging.info``) with its reason; the return value is ``config_cls(...)``.
    """
    choices: dict = {}
    hidden = int(_text_config(model).hidden_size)
    dim = min(MAX_PROJECTION_DIM, max(MIN_PROJECTION_DIM, _power_of_two_at_most(hidden / 2)))
    _choose(choices, overrides, "craft_projection_dim", dim,
            f"hidden size {hidden}: largest power of two <= hidden/2, within [{MIN_PROJECTION_DIM}, {MAX_PROJECTION_DIM}]")

    sft_batch = overrides.get("per_device_train_batch_size", _field_default(config_cls, "per_device_train_batch_size"))
    con_batch = overrides.get("craft_contrastive_batch_size") or sft_batch
    n_sft, n_con = _rows(sft_dataset), _rows(contrastive_dataset) if contrastive_dataset is not None else None
    if n_sft and n_con:
        sft_batches, con_batches = math.ceil(n_sft / sft_batch), math.ceil(n_con / con_batch)
        raw = con_batches / (con_batches + sft_batches)
        beta = round(min(BETA_RANGE[1], max(BETA_RANGE[0], raw)), 4)
        _choose(choices, overrides, "craft_beta", beta,
                f"{con_batches} contrastive and {sft_batches} SFT micro-batches per epoch give beta {raw:.4f} "
                f"(both loaders end together), clamped to {list(BETA_RANGE)}")
    else:
        logger.info("CRAFT auto: craft_beta left at its default: %s",
                    "no separate contrastive dataset (self-align draws its positives from the SFT batches)"
                    if contrastive_dataset is None else "a dataset has no length")

    _choose_gradcache(choices, overrides, model, sft_dataset, contrastive_dataset, con_batch, available_memory_gb)

    if n_con is not None and n_con >= QUEUE_MIN_CONTRASTIVE_ROWS:
        size = min(MAX_QUEUE_SIZE, _power_of_two_at_most(n_con / 2))
        _choose(choices, overrides, "craft_negative_strategy", "queue",
                f"{n_con} contrastive rows (>= {QUEUE_MIN_CONTRASTIVE_ROWS}): past positives add negatives")
        _choose(choices, overrides, "craft_negative_queue_size", size,
                f"largest power of two <= half of the {n_con} contrastive rows, at most {MAX_QUEUE_SIZE}")
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
