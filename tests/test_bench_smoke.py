"""The arithmetic and plumbing of the benchmarks (bench/mfu.py, bench/craft_vs_original.py, bench/craft_worker.py).

No timing is asserted: the numbers checked are FLOP counts, parameter counts, table look-ups and data shapes.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import craft_vs_original  # noqa: E402
import craft_worker  # noqa: E402
import mfu  # noqa: E402


def test_flops_per_token_formula():
    # 4·N_frozen + 6·N_trainable + 12·L·H·T = 4·10 + 6·2 + 12·1·2·3
    assert mfu.flops_per_token(frozen=10, trainable=2, layers=1, hidden=2, seq=3) == 40 + 12 + 72


def test_frozen_matmul_weights_counts_linear_layers_and_head_only():
    size = dict(hidden=32, layers=2, heads=2, intermediate=48, vocab=100, seq=16, micro_batch=1)
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(mfu.llama_config(size))
    hidden, inner, vocab = 32, 48, 100
    per_layer = 4 * hidden * hidden + 3 * hidden * inner  # q, k, v, o (kv heads = heads) + gate, up, down
    assert mfu.frozen_matmul_weights(model) == 2 * per_layer + vocab * hidden  # + untied LM head, no embedding


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0),
    ("NVIDIA A10", 125.0), ("Tesla T4", None),
])
def test_datasheet_peaks(name, tflops):
    assert mfu.datasheet_peak_tflops(name) == tflops


def test_measured_matmul_peak_is_a_rate():
    peak = mfu.measured_matmul_peak("cpu", torch.float32, size=64, repeats=2)
    assert peak > 0 and peak == peak and peak != float("inf")


def test_saved_tensor_elements(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(3, 4), "b": torch.zeros(5)}, str(tmp_path / "adapter.safetensors"))
    save_file({"c": torch.zeros(2, 2, 2)}, str(tmp_path / "more.safetensors"))
    assert mfu.saved_tensor_elements(tmp_path) == 12 + 5 + 8


def test_random_text_gives_enough_tokens(tmp_path):
    from craft.testing import make_tokenizer

    path = tmp_path / "data.jsonl"
    mfu.write_random_text(path, tokens_needed=3000)
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    tokens = sum(len(ids) for ids in make_tokenizer()(texts, add_special_tokens=False)["input_ids"])
    assert tokens >= 3000


def test_generated_config_is_valid_for_craft_train(tmp_path):
    from craft.engine.config import load_config

    size = dict(mfu.SIZES["cpu"])
    for mode in ("lora", "control"):
        path = tmp_path / f"{mode}.toml"
        mfu.write_config(path, mode, tmp_path / "base", tmp_path / "d.jsonl", tmp_path / "out", size, "cpu", 5, 8)
        config = load_config(path)
        assert config.use_control_adapters == (mode == "control")
        assert (config.lora_rank, config.max_steps, config.sequence_len) == (8, 5, size["seq"])
        assert config.model_dtype == "float32" and config.evals_per_run == 0


def test_timing_order_alternates():
    assert craft_vs_original.timing_order(1) == ["ours", "original"]
    assert craft_vs_original.timing_order(2) == ["ours", "original", "original", "ours"]


def test_baseline_pins_the_main_venv_versions(monkeypatch):
    pins = craft_vs_original.baseline_requirements()
    assert pins[0] == "contrastive-ft[all]==0.4.3"
    for name in craft_vs_original.MIRRORED:
        assert f"{name}=={importlib.metadata.version(name)}" in pins
    monkeypatch.delenv("TORCH_SPEC", raising=False)
    assert craft_vs_original.torch_requirement() == "torch==" + importlib.metadata.version("torch").split("+")[0]
    monkeypatch.setenv("TORCH_SPEC", "torch==9.9.9+cu999")
    assert craft_vs_original.torch_requirement() == "torch==9.9.9+cu999"


def test_feature_matrix_marks():
    table = craft_vs_original.feature_matrix([{"feature": "a", "ok": True, "note": "fine"},
                                              {"feature": "b", "ok": False, "note": "KeyError: 'x|y'"}])
    lines = table.splitlines()
    assert lines[2] == "| a | ✓ | fine |"
    assert lines[3] == "| b | ✗ | KeyError: 'x/y' |"


def test_worker_rows_and_model():
    sft, contrastive = craft_worker.make_rows(3, seq=5, vocab=50, seed=0)
    assert len(sft) == len(contrastive) == 3
    assert all(row["labels"] == row["input_ids"] and len(row["input_ids"]) == 5 for row in sft)
    assert all(row["labels"] == [-100] * 5 and len(row["input_ids_tgt"]) == 5 for row in contrastive)
    assert craft_worker.make_rows(3, 5, 50, seed=0) == (sft, contrastive)  # seeded
    model = craft_worker.build_model(hidden=64, layers=2, vocab=50, seq=8, device="cpu", dtype=torch.float32)
    again = craft_worker.build_model(hidden=64, layers=2, vocab=50, seq=8, device="cpu", dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    assert model.config.intermediate_size == 64 * 8 // 3


def test_worker_tokenizer():
    tokenizer = craft_worker.word_tokenizer(16)
    assert tokenizer("t5 t15 zz", add_special_tokens=False)["input_ids"] == [5, 15, 3]
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)


def test_worker_times_our_trainer():
    """The timing harness runs our CRAFTTrainerMixin on transformers.Trainer (structure only, no timing)."""
    options = craft_worker.argparse.Namespace(impl="ours", hidden=32, layers=1, vocab=64, seq=8, batch=2,
                                              accumulation=2, warmup=1, steps=1, threads=1)
    threads = torch.get_num_threads()
    try:
        result = craft_worker.time_training(options)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert result["impl"] == "ours" and result["steps_timed"] == 1 and result["step_seconds"] > 0
    assert result["step_cpu_seconds"] > 0
    assert result["peak_memory_mb"] > 0 and "memory_growth_mb" in result


def test_alpha_share_probe_measures_alpha_for_ours(tmp_path):
    """The feature-matrix probe that finds the original's SFT share (27 %) finds exactly alpha = 0.6 for ours."""
    a, b, residual = craft_worker.alpha_share("ours", str(tmp_path))
    assert residual < 1e-5
    assert a == pytest.approx(0.6, abs=1e-5) and b == pytest.approx(0.4, abs=1e-5)
