"""CRAFT config classes: defaults, host-class composition, and validation errors that name the key."""

import dataclasses
import json

import pytest

from craft.config import CRAFTSFTConfig, CRAFTTrainingArguments, craft_field_names
from craft.errors import UserError

README_DEFAULTS = {  # contrastive-ft 0.4.3's defaults, except craft_assistant_mask_key and craft_report_metrics
    "craft_alpha": 0.6, "craft_beta": 0.6, "craft_beta_mode": "fixed", "craft_length_strategy": "oversample",
    "craft_contrastive_batch_size": None, "craft_temperature": 0.05, "craft_learnable_temperature": False,
    "craft_projection_dim": 256, "craft_projection_dropout": 0.0, "craft_pooling": "last_token",
    "craft_use_hidden_state_hook": True, "craft_use_gradcache": False, "craft_gradcache_chunk_size": 4,
    "craft_negative_strategy": "in_batch", "craft_negative_queue_size": 65536, "craft_gather_negatives": None,
    "craft_gradient_balancing": "none", "craft_assistant_mask_key": "assistant_mask", "craft_report_metrics": True,
    "craft_assistant_mask_strategy": "auto",
    "craft_contrastive_keys": {"anchor_input_ids": "input_ids", "anchor_attention_mask": "attention_mask",
                               "anchor_labels": "labels", "positive_input_ids": "input_ids_tgt",
                               "positive_attention_mask": "attention_mask_tgt"},
    "craft_loss_scale_momentum": 0.99, "craft_gradnorm_alpha": 1.5, "craft_gradient_clip_per_task": False,
    "craft_gradient_clip_value": 1.0, "craft_debug": False,
}


def test_defaults_match_readme_and_fields_follow_host_fields():
    args = CRAFTSFTConfig("out", use_cpu=True, report_to=[])
    assert {name: getattr(args, name) for name in craft_field_names()} == README_DEFAULTS
    names = [f.name for f in dataclasses.fields(CRAFTSFTConfig)]
    assert names[0] == "output_dir"  # positional output_dir still works
    assert names[-len(README_DEFAULTS):] == list(README_DEFAULTS)
    assert args.output_dir == "out" and args.max_length == 1024  # SFTConfig's own __post_init__ ran


def test_config_serialises_to_json_with_craft_keys():
    args = CRAFTTrainingArguments(output_dir="o", use_cpu=True, craft_alpha=0.3, craft_report_metrics=["temperature"])
    data = json.loads(args.to_json_string())
    assert data["craft_alpha"] == 0.3 and data["craft_report_metrics"] == ["temperature"]
    assert "craft_unavailable_features" not in data


def test_report_metrics_selection():
    args = CRAFTSFTConfig("o", use_cpu=True, craft_report_metrics=["contrastive_accuracy"])
    assert args.craft_metric_enabled("contrastive_accuracy")
    assert not args.craft_metric_enabled("temperature")
    assert not CRAFTSFTConfig("o", use_cpu=True, craft_report_metrics=False).craft_metric_enabled("temperature")


@pytest.mark.parametrize("key,value", [
    ("craft_alpha", 1.5), ("craft_alpha", -0.1), ("craft_alpha", "0.5"), ("craft_beta", 2),
    ("craft_beta_mode", "sometimes"), ("craft_length_strategy", "truncate"), ("craft_contrastive_batch_size", 0),
    ("craft_temperature", 0.0), ("craft_temperature", -1), ("craft_projection_dim", 0),
    ("craft_projection_dropout", 1.0), ("craft_pooling", "max"), ("craft_gradcache_chunk_size", 0),
    ("craft_negative_strategy", "hard"), ("craft_negative_queue_size", -5), ("craft_gradient_balancing", "adam"),
    ("craft_learnable_temperature", "yes"), ("craft_gather_negatives", 1), ("craft_assistant_mask_key", ""),
    ("craft_report_metrics", ["loss"]), ("craft_assistant_mask_strategy", "guess"),
    ("craft_contrastive_keys", {"anchor_ids": "q"}), ("craft_contrastive_keys", {"anchor_input_ids": ""}),
    ("craft_loss_scale_momentum", 1.0), ("craft_gradnorm_alpha", 0), ("craft_gradient_clip_value", -1.0),
    ("craft_gradient_clip_per_task", 1), ("craft_debug", "on"),
])
def test_invalid_value_names_the_key(key, value):
    with pytest.raises(UserError, match=f"^{key}: "):
        CRAFTSFTConfig("o", use_cpu=True, **{key: value})


@pytest.mark.parametrize("key,value", [
    ("craft_use_gradcache", True), ("craft_negative_strategy", "queue"), ("craft_gradient_balancing", "pcgrad"),
    ("craft_gradient_balancing", "uncertainty"),
])
def test_scale_features_are_accepted(key, value):
    assert getattr(CRAFTTrainingArguments(output_dir="o", use_cpu=True, **{key: value}), key) == value
