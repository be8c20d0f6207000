"""CRAFT configuration: every `craft_*` knob of the CRAFT README, validated once, on construction.

`CRAFTConfigMixin` is a dataclass mixin. Combined with a transformers / TRL argument class it adds the CRAFT
fields after the host's own fields (all have defaults, so `output_dir` stays the first positional argument):

    >>> from craft.config import CRAFTSFTConfig
    >>> args = CRAFTSFTConfig(output_dir="out", craft_alpha=0.6, craft_beta=0.5, use_cpu=True, report_to=[])
    >>> args.craft_alpha
    0.6

A value outside its range raises `craft.errors.UserError` naming the key and what is allowed.

The objective the trainers optimise, per optimizer step (see `craft.accumulator`):

    J = craft_alpha * L_sft + (1 - craft_alpha) * L_con

`craft_beta` is the fraction of micro-batches drawn from the SFT loader (contrastive-ft 0.4.3's meaning; the rest
are contrastive); `craft_beta_mode="auto"` or `craft_length_strategy="auto_beta"` derive it from the two loaders'
batch counts instead. Every key of contrastive-ft 0.4.3's config is accepted and implemented, with its defaults
(docs/compatibility.md lists the differences).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from craft.data import CONTRASTIVE_KEYS
from craft.errors import UserError
from craft.validation import reject_unknown_craft_keys
from craft.presets import CRAFT_PRESETS, auto_configure, get_preset  # noqa: F401  (contrastive-ft 0.4.3 names)

BETA_MODES = ("fixed", "auto")
LENGTH_STRATEGIES = ("oversample", "cap", "auto_beta", "error")
POOLINGS = ("last_token", "mean", "cls", "weighted_mean")
NEGATIVE_STRATEGIES = ("in_batch", "queue", "none")
ASSISTANT_MASK_STRATEGIES = ("auto", "provided", "none")
GRADIENT_BALANCING = ("none", "loss_scale", "uncertainty", "gradnorm", "pcgrad")
# Names accepted in `craft_report_metrics` when it is a list (True = all of them, False = none).
REPORTABLE_METRICS = ("contrastive_accuracy", "representation_consistency", "temperature")


@dataclass
class CRAFTConfigMixin:
    """The CRAFT knobs. Mix into a `transformers.TrainingArguments` subclass (it must come first in the bases).

    ``craft_fixed_schedule`` (a class attribute, not a knob) is True on the preference / RL configs: their trainers
    draw contrastive micro-batches at the fixed rate ``craft_beta`` beside the host's own loader, so presets give
    them ``craft_beta_mode="fixed"`` and ``craft_length_strategy="oversample"`` (`craft.presets.config_from_preset`).

    Knobs (defaults in brackets):
        craft_alpha [0.6]: weight of the SFT loss; the contrastive loss gets `1 - craft_alpha`. In [0, 1].
        craft_beta [0.6]: fraction of micro-batches drawn from the SFT loader; the rest are contrastive. In [0, 1].
        craft_beta_mode ["fixed"]: "auto" derives beta from the loaders' batch counts.
        craft_length_strategy ["oversample"]: "oversample" | "cap" | "auto_beta" | "error" (see `craft.data`).
        craft_contrastive_batch_size [None]: contrastive micro-batch size; None means per_device_train_batch_size.
        craft_temperature [0.05]: InfoNCE temperature tau > 0 (the initial value when learnable).
        craft_learnable_temperature [False]: learn log(tau) (CLIP style; tau >= 0.01).
        craft_projection_dim [256]: output size of the projection head (> 0).
        craft_projection_dropout [0.0]: dropout inside the projection head, in [0, 1).
        craft_pooling ["last_token"]: "last_token" | "mean" | "cls" | "weighted_mean".
        craft_use_hidden_state_hook [True]: capture the final-norm output with a forward hook; False asks the
            model for `output_hidden_states=True` (all layers kept: more memory).
        craft_use_gradcache [False], craft_gradcache_chunk_size [4]: GradCache for contrastive micro-batches,
            re-forwarding chunks of this many sequences (`craft.gradcache`; exact gradients, less memory).
        craft_negative_strategy ["in_batch"]: "in_batch" | "queue" | "none". "queue" adds a MoCo FIFO of past
            positives as extra negatives (`craft.negatives`); "none" uses the positives of the other rows only,
            which is what in-batch InfoNCE does without extra negatives — both give the same loss here.
        craft_negative_queue_size [65536]: MoCo queue length (> 0).
        craft_gather_negatives [None]: with several ranks, score each anchor against the positives of every
            rank (all-gathered with their gradient; the queue then holds every rank's positives). None means True
            when the world size is > 1; False keeps each rank's negatives to its own batch.
        craft_gradient_balancing ["none"]: "none" | "loss_scale" | "uncertainty" | "gradnorm" | "pcgrad"
            (`craft.gradient_balancing`; the effective weights are logged as balancing/craft_weight_*).
        craft_assistant_mask_key ["assistant_mask"]: the batch column marking assistant tokens (self-align).
        craft_assistant_mask_strategy ["auto"]: how self-align finds the assistant span: "auto" — the
            craft_assistant_mask_key column when the batch has it, else labels != -100; "provided" — that column,
            required; "none" — no assistant span (self_align is then an error).
        craft_contrastive_keys [CONTRASTIVE_KEYS]: which batch columns hold the anchor / positive ids and masks
            of contrastive rows (keys "anchor_input_ids", "anchor_attention_mask", "anchor_labels",
            "positive_input_ids", "positive_attention_mask"; missing keys keep their default column).
        craft_report_metrics [True]: True logs every CRAFT metric, False none, or a list naming a subset of
            "contrastive_accuracy", "representation_consistency", "temperature". The loss terms are always logged.
        craft_loss_scale_momentum [0.99]: momentum μ of loss_scale balancing's running means, in [0, 1).
        craft_gradnorm_alpha [1.5]: GradNorm's asymmetry γ (> 0).
        craft_gradient_clip_per_task [False], craft_gradient_clip_value [1.0]: clip each task's gradient (SFT,
            contrastive) to this L2 norm over the step before they are added (`craft.gradient_balancing`).
        craft_debug [False]: log (logger "craft.trainers", level INFO) each optimizer step's window counts, loss
            weights, task losses and gradient norms.
    """

    craft_alpha: float = 0.6
    craft_beta: float = 0.6
    craft_beta_mode: str = "fixed"
    craft_length_strategy: str = "oversample"
    craft_contrastive_batch_size: int | None = None
    craft_temperature: float = 0.05
    craft_learnable_temperature: bool = False
    craft_projection_dim: int = 256
    craft_projection_dropout: float = 0.0
    craft_pooling: str = "last_token"
    craft_use_hidden_state_hook: bool = True
    craft_use_gradcache: bool = False
    craft_gradcache_chunk_size: int = 4
    craft_negative_strategy: str = "in_batch"
    craft_negative_queue_size: int = 65536
    craft_gather_negatives: bool | None = None
    craft_gradient_balancing: str = "none"
    craft_assistant_mask_key: str = "assistant_mask"
    craft_report_metrics: bool | list[str] = field(default=True)
    craft_assistant_mask_strategy: str = "auto"
    craft_contrastive_keys: dict[str, str] = field(default_factory=lambda: dict(CONTRASTIVE_KEYS))
    craft_loss_scale_momentum: float = 0.99
    craft_gradnorm_alpha: float = 1.5
    craft_gradient_clip_per_task: bool = False
    craft_gradient_clip_value: float = 1.0
    craft_debug: bool = False

    def __post_init__(self):
        validate_craft_config(self)
        parent_post_init = getattr(super(), "__post_init__", None)
        if parent_post_init is not None:
            parent_post_init()

    craft_fixed_schedule = False  # not annotated: a class attribute, not a dataclass field

    @classmethod
    def from_preset(cls, preset: str, output_dir: str = "./outputs", **overrides):
        """This config class from a preset of `craft.presets.PRESETS` (overrides win):
        ``CRAFTSFTConfig.from_preset("balanced", output_dir="out", learning_rate=1e-5)``."""
        from craft.presets import config_from_preset

        return config_from_preset(cls, preset, output_dir, **overrides)

    @classmethod
    def auto(cls, output_dir: str = "./outputs", model=None, sft_dataset=None, contrastive_dataset=None,
             available_memory_gb=None, **overrides):
        """This config class with settings chosen from the model, datasets and memory (`craft.presets.auto_config`)."""
        from craft.presets import auto_config

        return auto_config(cls, output_dir, model, sft_dataset, contrastive_dataset, available_memory_gb, **overrides)

    def craft_metric_enabled(self, name: str) -> bool:
        """Whether metric `name` (one of REPORTABLE_METRICS) is to be logged."""
        if isinstance(self.craft_report_metrics, bool):
            return self.craft_report_metrics
        return name in self.craft_report_metrics


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise UserError(f"{key}: {message}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_choice(config, key: str, choices: tuple[str, ...]) -> None:
    value = getattr(config, key)
    _require(value in choices, key, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")


def validate_craft_config(config) -> None:
    """Raise `UserError` naming the first `craft_*` key whose value is out of range or not implemented."""
    for key in ("craft_alpha", "craft_beta"):
        value = getattr(config, key)
        _require(_is_number(value) and 0.0 <= value <= 1.0, key, f"must be a number in [0, 1], got {value!r}")
    _check_choice(config, "craft_beta_mode", BETA_MODES)
    _check_choice(config, "craft_length_strategy", LENGTH_STRATEGIES)
    batch = config.craft_contrastive_batch_size
    _require(batch is None or (_is_int(batch) and batch > 0), "craft_contrastive_batch_size",
             f"must be None or a positive integer, got {batch!r}")
    temperature = config.craft_temperature
    _require(_is_number(temperature) and temperature > 0, "craft_temperature", f"must be > 0, got {temperature!r}")
    for key in ("craft_projection_dim", "craft_gradcache_chunk_size", "craft_negative_queue_size"):
        value = getattr(config, key)
        _require(_is_int(value) and value > 0, key, f"must be a positive integer, got {value!r}")
    dropout = config.craft_projection_dropout
    _require(_is_number(dropout) and 0.0 <= dropout < 1.0, "craft_projection_dropout",
             f"must be a number in [0, 1), got {dropout!r}")
    _check_choice(config, "craft_pooling", POOLINGS)
    _check_choice(config, "craft_negative_strategy", NEGATIVE_STRATEGIES)
    _check_choice(config, "craft_gradient_balancing", GRADIENT_BALANCING)
    _check_choice(config, "craft_assistant_mask_strategy", ASSISTANT_MASK_STRATEGIES)
    momentum = config.craft_loss_scale_momentum
    _require(_is_number(momentum) and 0.0 <= momentum < 1.0, "craft_loss_scale_momentum",
             f"must be a number in [0, 1), got {momentum!r}")
    for key in ("craft_gradnorm_alpha", "craft_gradient_clip_value"):
        value = getattr(config, key)
        _require(_is_number(value) and value > 0, key, f"must be a number > 0, got {value!r}")
    keys = config.craft_contrastive_keys
    _require(isinstance(keys, dict) and all(isinstance(v, str) and v for v in keys.values())
             and set(keys) <= set(CONTRASTIVE_KEYS), "craft_contrastive_keys",
             f"must map some of {', '.join(map(repr, CONTRASTIVE_KEYS))} to column names, got {keys!r}")
    config.craft_contrastive_keys = {**CONTRASTIVE_KEYS, **keys}
    for key in ("craft_learnable_temperature", "craft_use_hidden_state_hook", "craft_use_gradcache",
                "craft_gradient_clip_per_task", "craft_debug"):
        value = getattr(config, key)
        _require(isinstance(value, bool), key, f"must be True or False, got {value!r}")
    gather = config.craft_gather_negatives
    _require(gather is None or isinstance(gather, bool), "craft_gather_negatives",
             f"must be None, True or False, got {gather!r}")
    key = "craft_assistant_mask_key"
    _require(isinstance(config.craft_assistant_mask_key, str) and config.craft_assistant_mask_key, key,
             f"must be a non-empty column name, got {config.craft_assistant_mask_key!r}")
    _validate_report_metrics(config.craft_report_metrics)


def _validate_report_metrics(value) -> None:
    if isinstance(value, bool):
        return
    ok = isinstance(value, (list, tuple)) and all(name in REPORTABLE_METRICS for name in value)
    _require(ok, "craft_report_metrics",
             f"must be True, False or a list of {', '.join(map(repr, REPORTABLE_METRICS))}, got {value!r}")


def craft_field_names() -> list[str]:
    """The names of the user-facing CRAFT knobs, in declaration order."""
    return [f.name for f in dataclasses.fields(CRAFTConfigMixin)]


def _training_arguments_class():
    from transformers import TrainingArguments

    return TrainingArguments


def _sft_config_class():
    from trl import SFTConfig

    return SFTConfig


@reject_unknown_craft_keys
@dataclass
class CRAFTTrainingArguments(CRAFTConfigMixin, _training_arguments_class()):
    """`transformers.TrainingArguments` plus the CRAFT knobs, for `class T(CRAFTTrainerMixin, Trainer)`."""


@reject_unknown_craft_keys
@dataclass
class CRAFTSFTConfig(CRAFTConfigMixin, _sft_config_class()):
    """`trl.SFTConfig` plus the CRAFT knobs, for `craft.trainers.CRAFTSFTTrainer`."""


class TRLFeatureUnavailable(UserError, ImportError):
    """A CRAFT class whose TRL counterpart the installed TRL does not have (raised when the name is imported)."""


def trl_version() -> str:
    import trl

    return trl.__version__


def _trl_config_class(name: str):
    import trl

    return getattr(trl, name)


@reject_unknown_craft_keys
@dataclass
class CRAFTDPOConfig(CRAFTConfigMixin, _trl_config_class("DPOConfig")):
    """`trl.DPOConfig` plus the CRAFT knobs, for `craft.trainers.CRAFTDPOTrainer`."""

    craft_fixed_schedule = True  # see CRAFTConfigMixin


@reject_unknown_craft_keys
@dataclass
class CRAFTGRPOConfig(CRAFTConfigMixin, _trl_config_class("GRPOConfig")):
    """`trl.GRPOConfig` plus the CRAFT knobs, for `craft.trainers.CRAFTGRPOTrainer`."""

    craft_fixed_schedule = True  # see CRAFTConfigMixin


@reject_unknown_craft_keys
@dataclass
class CRAFTKTOConfig(CRAFTConfigMixin, _trl_config_class("KTOConfig")):
    """`trl.KTOConfig` plus the CRAFT knobs, for `craft.trainers.CRAFTKTOTrainer`."""

    craft_fixed_schedule = True  # see CRAFTConfigMixin


@reject_unknown_craft_keys
@dataclass
class CRAFTRLOOConfig(CRAFTConfigMixin, _trl_config_class("RLOOConfig")):
    """`trl.RLOOConfig` plus the CRAFT knobs, for `craft.trainers.CRAFTRLOOTrainer`."""

    craft_fixed_schedule = True  # see CRAFTConfigMixin


_LAZY_CONFIGS: dict[str, type] = {}


def _lazy_config(name: str):
    """CRAFTORPOConfig (ORPO lives in `trl.experimental`, imported only when asked for) and CRAFTPPOConfig.

    With a TRL that has no PPOConfig (TRL 1.x removed PPO), CRAFTPPOConfig is the CRAFT knobs on
    `transformers.TrainingArguments`, so code and presets that build it keep working; `CRAFTPPOTrainer` is what
    raises, saying why and what to use instead.
    """
    import trl

    if name == "CRAFTORPOConfig":
        from trl.experimental.orpo import ORPOConfig as host
    else:
        host = getattr(trl, "PPOConfig", None) or _training_arguments_class()
    doc = f"`{host.__module__}.{host.__name__}` plus the CRAFT knobs."
    return reject_unknown_craft_keys(dataclass(type(name, (CRAFTConfigMixin, host),
                                                    {"__doc__": doc, "__module__": __name__,
                                                     "craft_fixed_schedule": True})))


def __getattr__(name: str):
    if name in ("CRAFTORPOConfig", "CRAFTPPOConfig"):
        if name not in _LAZY_CONFIGS:
            _LAZY_CONFIGS[name] = _lazy_config(name)
        return _LAZY_CONFIGS[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
