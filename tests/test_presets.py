"""Presets and auto-configuration: every preset builds a config; auto's choices against hand-computed values, each
logged with its reason; overrides win; errors name the preset / setting."""

from __future__ import annotations

import logging

import pytest

from craft.config import CRAFTSFTConfig, CRAFTTrainingArguments
from craft.errors import UserError
from craft.presets import PRESETS, auto_config, config_from_preset, detect_available_memory_gb, estimate_memory_bytes
from craft.testing import tiny_model

COMMON = dict(use_cpu=True, report_to=[])


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_a_config(name, tmp_path):
    args = config_from_preset(CRAFTTrainingArguments, name, str(tmp_path), **COMMON)
    for key, value in PRESETS[name].items():
        assert getattr(args, key) == value


def test_preset_overrides_win_and_classmethod(tmp_path):
    args = CRAFTSFTConfig.from_preset("large_batch", output_dir=str(tmp_path), craft_gradcache_chunk_size=2, **COMMON)
    assert args.craft_gradcache_chunk_size == 2 and args.craft_negative_strategy == "queue"
    assert isinstance(args, CRAFTSFTConfig)


def test_preset_errors_name_the_problem(tmp_path):
    with pytest.raises(UserError, match="Unknown preset 'fast'.*minimal, balanced"):
        config_from_preset(CRAFTTrainingArguments, "fast", str(tmp_path))
    with pytest.raises(UserError, match="no setting 'craft_alfa'"):
        config_from_preset(CRAFTTrainingArguments, "minimal", str(tmp_path), craft_alfa=0.3)


def _rows(n, length):
    return [{"input_ids": list(range(4, 4 + length)), "input_ids_tgt": list(range(5, 5 + length))} for _ in range(n)]


def test_estimate_memory_by_hand():
    model = tiny_model("llama")  # float32, 2 layers, hidden 64, 4 heads
    params = sum(p.numel() for p in model.parameters())
    static, per_sequence = estimate_memory_bytes(model, 10)
    assert static == params * 4 + params * 12
    assert per_sequence == 2 * (34 * 10 * 64 + 5 * 4 * 10 * 10) * 4 // 2  # 95040 bytes


def test_auto_choices_with_plenty_of_memory(tmp_path, caplog):
    model = tiny_model("llama")
    with caplog.at_level(logging.INFO, logger="craft.presets"):
        args = auto_config(CRAFTTrainingArguments, str(tmp_path), model, _rows(40, 6),
                           contrastive_dataset=_rows(60, 8), available_memory_gb=64,
                           per_device_train_batch_size=4, **COMMON)
    assert args.craft_projection_dim == 64  # hidden 64 -> 64 // 4 = 16, raised to the minimum 64
    # 60 / 4 = 15 contrastive micro-batches, 40 / 4 = 10 SFT ones: beta (the SFT fraction) = 10 / 25
    assert args.craft_beta == pytest.approx(0.4)
    assert args.craft_gradient_balancing == "loss_scale"  # from the balanced preset
    assert args.craft_use_gradcache is False
    assert args.craft_negative_strategy == "in_batch"
    text = caplog.text
    assert "craft_projection_dim=64 because hidden size 64" in text
    assert "craft_beta=0.4 because 10 SFT and 15 contrastive micro-batches" in text
    assert "craft_use_gradcache=False because" in text


def test_auto_turns_gradcache_on_when_the_batch_does_not_fit(tmp_path, caplog):
    model = tiny_model("llama")
    static, per_sequence = estimate_memory_bytes(model, 8)
    # budget (80 % of the memory, minus static) holds 5 sequences: the batch of 2 x 4 = 8 does not fit -> chunk 4
    memory_gb = (static + 5.5 * per_sequence) / 0.8 / 2**30
    with caplog.at_level(logging.INFO, logger="craft.presets"):
        args = auto_config(CRAFTTrainingArguments, str(tmp_path), model, _rows(8, 4), contrastive_dataset=_rows(8, 8),
                           available_memory_gb=memory_gb, per_device_train_batch_size=4, **COMMON)
    assert args.craft_use_gradcache is True and args.craft_gradcache_chunk_size == 4
    assert "craft_use_gradcache=True because a contrastive batch (8 sequences of 8 tokens)" in caplog.text
    # 9.5 sequences fit: the 8 of the batch too -> no GradCache
    memory_gb = (static + 9.5 * per_sequence) / 0.8 / 2**30
    args = auto_config(CRAFTTrainingArguments, str(tmp_path), model, _rows(8, 4), contrastive_dataset=_rows(8, 8),
                       available_memory_gb=memory_gb, per_device_train_batch_size=4, **COMMON)
    assert args.craft_use_gradcache is False


def test_auto_queue_for_large_contrastive_sets_and_overrides(tmp_path, caplog):
    model = tiny_model("llama")
    with caplog.at_level(logging.INFO, logger="craft.presets"):
        args = auto_config(CRAFTTrainingArguments, str(tmp_path), model, _rows(100, 4),
                           contrastive_dataset=_rows(20_000, 4), available_memory_gb=64,
                           craft_projection_dim=48, **COMMON)
    assert args.craft_negative_strategy == "queue"
    assert args.craft_negative_queue_size == 8192  # largest power of two <= 10 000
    assert args.craft_projection_dim == 48
    assert "craft_projection_dim=48 kept from the overrides" in caplog.text
    assert args.craft_beta == pytest.approx(0.3)  # 13 SFT vs 2500 contrastive batches: clamped


def test_auto_without_contrastive_dataset_and_classmethod(tmp_path, caplog):
    model = tiny_model("llama")
    with caplog.at_level(logging.INFO, logger="craft.presets"):
        args = CRAFTSFTConfig.auto(str(tmp_path), model, _rows(10, 4), available_memory_gb=64, **COMMON)
    assert args.craft_beta == CRAFTSFTConfig.craft_beta  # default kept
    assert "craft_beta left at its default" in caplog.text


def test_detect_available_memory_reads_meminfo():
    with open("/proc/meminfo") as handle:
        available = next(int(line.split()[1]) for line in handle if line.startswith("MemAvailable:"))
    assert detect_available_memory_gb() == pytest.approx(available / 2**20, rel=0.2)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_give_the_wrapper_configs_the_fixed_schedule_they_run(name, tmp_path):
    """A preset's auto beta becomes fixed beta / oversample on a preference config (its trainer refuses the
    automatic keys); the rest of the preset is kept, the SFT config keeps auto beta, and overrides still win."""
    from craft.config import CRAFTDPOConfig

    args = CRAFTDPOConfig.from_preset(name, output_dir=str(tmp_path), **COMMON)
    assert (args.craft_beta_mode, args.craft_length_strategy) == ("fixed", "oversample")
    for key, value in PRESETS[name].items():
        if key not in ("craft_beta_mode", "craft_length_strategy"):
            assert getattr(args, key) == value
    sft = CRAFTSFTConfig.from_preset(name, output_dir=str(tmp_path), **COMMON)
    assert sft.craft_beta_mode == PRESETS[name]["craft_beta_mode"]
    explicit = CRAFTDPOConfig.from_preset(name, output_dir=str(tmp_path), craft_beta_mode="auto", **COMMON)
    assert explicit.craft_beta_mode == "auto"
