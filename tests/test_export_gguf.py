"""`craft export-gguf`: read the file back with `gguf.GGUFReader` and compare keys, names and values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from craft.cli import main
from craft.testing import save_tiny_model
from test_export_fixtures import make_control_adapter, make_lora


def _read(path):
    from gguf import GGUFReader

    reader = GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {tensor.name: np.array(tensor.data) for tensor in reader.tensors}
    return fields, tensors


def _interleave_rows(matrix: np.ndarray, heads: int) -> np.ndarray:
    """Reference for llama.cpp's rotary reorder, written as an index list: within each head of size d, output row
    2j + t is input row t·d/2 + j."""
    d = matrix.shape[0] // heads
    order = [h * d + t * (d // 2) + j for h in range(heads) for j in range(d // 2) for t in range(2)]
    return matrix[order]


def _peft_factors(lora_dir):
    tensors = load_file(lora_dir / "adapter_model.safetensors")
    return {key.removeprefix("base_model.model."): value.numpy() for key, value in tensors.items()}


@pytest.mark.parametrize("family,permuted", [("llama", True), ("qwen2", False)])
def test_lora_gguf_has_llama_cpp_names_layout_and_permutation(tmp_path, family, permuted):
    base_dir = save_tiny_model(tmp_path / "base", family)
    make_lora(base_dir, tmp_path / "lora", ["q_proj", "k_proj", "o_proj", "down_proj"], lora_alpha=8)
    out = tmp_path / "lora.gguf"
    assert main(["export-gguf", str(tmp_path / "lora"), str(out), "--base", str(base_dir)]) == 0
    fields, tensors = _read(out)
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == family and fields["adapter.lora.alpha"] == pytest.approx(8.0)
    expected_names = {f"blk.{i}.{name}.weight.lora_{ab}" for i in range(2)
                      for name in ("attn_q", "attn_k", "attn_output", "ffn_down") for ab in "ab"}
    assert set(tensors) == expected_names
    factors = _peft_factors(tmp_path / "lora")
    heads = {"q_proj": 4, "k_proj": 2}  # num_attention_heads, num_key_value_heads of the tiny models
    modules = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_output": "self_attn.o_proj",
               "ffn_down": "mlp.down_proj"}
    for layer in range(2):
        for gguf_name, module in modules.items():
            a = factors[f"model.layers.{layer}.{module}.lora_A.weight"]
            b = factors[f"model.layers.{layer}.{module}.lora_B.weight"]
            short = module.rpartition(".")[2]
            if permuted and short in heads:
                b = _interleave_rows(b, heads[short])
            np.testing.assert_array_equal(tensors[f"blk.{layer}.{gguf_name}.weight.lora_a"], a)
            np.testing.assert_array_equal(tensors[f"blk.{layer}.{gguf_name}.weight.lora_b"], b)


def test_control_adapter_gguf_equals_its_converted_lora(tmp_path):
    _, adapter_dir, _ = make_control_adapter(tmp_path, "mixtral", type="symmetric")
    assert main(["convert", str(adapter_dir), str(tmp_path / "lora"), "--direction", "-1"]) == 0
    assert main(["export-gguf", str(adapter_dir), str(tmp_path / "ca.gguf"), "--direction", "-1",
                 "--outtype", "f16"]) == 0
    fields, tensors = _read(tmp_path / "ca.gguf")
    assert fields["adapter.lora.alpha"] == pytest.approx(4.0)  # = rank: llama.cpp scale alpha / r = 1
    factors = _peft_factors(tmp_path / "lora")
    experts = 4
    for layer in range(2):
        a = tensors[f"blk.{layer}.attn_output.weight.lora_a"]
        assert a.dtype == np.float16
        np.testing.assert_allclose(a, factors[f"model.layers.{layer}.self_attn.o_proj.lora_A.weight"], rtol=1e-3,
                                   atol=1e-3)
        # fused experts: PEFT packs rows e·r+k of A and columns k·E+e of B; GGUF stores (E, r, in) / (E, out, r)
        a = tensors[f"blk.{layer}.ffn_down_exps.weight.lora_a"].astype(np.float32)
        b = tensors[f"blk.{layer}.ffn_down_exps.weight.lora_b"].astype(np.float32)
        peft_a = factors[f"model.layers.{layer}.mlp.experts.lora_A.weight"]
        peft_b = factors[f"model.layers.{layer}.mlp.experts.lora_B.weight"]
        assert a.shape == (experts, 4, 128) and b.shape == (experts, 64, 4)
        for expert in range(experts):
            np.testing.assert_allclose(a[expert], peft_a[4 * expert:4 * expert + 4], rtol=1e-3, atol=1e-3)
            np.testing.assert_allclose(b[expert], peft_b[:, expert::experts], rtol=1e-3, atol=1e-3)


def test_rank_pattern_folds_scales_with_alpha_zero(tmp_path):
    base_dir = save_tiny_model(tmp_path / "base", "phi3")
    make_lora(base_dir, tmp_path / "lora", ["qkv_proj", "down_proj"], rank_pattern={"down_proj": 2})
    assert main(["export-gguf", str(tmp_path / "lora"), str(tmp_path / "p.gguf"), "--base", str(base_dir)]) == 0
    fields, tensors = _read(tmp_path / "p.gguf")
    assert fields["adapter.lora.alpha"] == 0.0
    factors = _peft_factors(tmp_path / "lora")
    np.testing.assert_allclose(tensors["blk.0.ffn_down.weight.lora_b"],
                               factors["model.layers.0.mlp.down_proj.lora_B.weight"] * 8 / 2, rtol=1e-6)
    np.testing.assert_allclose(tensors["blk.1.attn_qkv.weight.lora_b"],
                               factors["model.layers.1.self_attn.qkv_proj.lora_B.weight"] * 8 / 4, rtol=1e-6)


def test_gguf_user_errors(tmp_path, capsys):
    base_dir = save_tiny_model(tmp_path / "base", "llama")
    make_lora(base_dir, tmp_path / "head", ["o_proj", "lm_head"])
    assert main(["export-gguf", str(tmp_path / "head"), str(tmp_path / "x.gguf"), "--base", str(base_dir)]) == 2
    assert "lm_head" in capsys.readouterr().err and not (tmp_path / "x.gguf").exists()
    make_lora(base_dir, tmp_path / "plain", ["o_proj"])
    (tmp_path / "taken.gguf").write_bytes(b"old")
    assert main(["export-gguf", str(tmp_path / "plain"), str(tmp_path / "taken.gguf"), "--base", str(base_dir)]) == 2
    assert "--force" in capsys.readouterr().err and (tmp_path / "taken.gguf").read_bytes() == b"old"
    assert main(["export-gguf", str(tmp_path / "nothing"), str(tmp_path / "y.gguf")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_rotary_row_interleave_maps_half_split_rope_to_interleaved_rope():
    """Why lora_b of q/k is permuted: with P the row reorder, P·rope_hf(q) = rope_interleaved(P·q)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from craft.export.gguf_export import interleave_rotary_rows

    heads, dim, length = 3, 8, 5
    q = torch.randn(1, heads, length, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    angles = torch.arange(length, dtype=torch.float64)[:, None] / 10000 ** (torch.arange(0, dim, 2) / dim)
    cos, sin = torch.cat([angles, angles], -1).cos()[None], torch.cat([angles, angles], -1).sin()[None]
    rotated, _ = apply_rotary_pos_emb(q, q, cos, sin)

    def as_rows(x):  # (1, heads, length, dim) -> (heads·dim, length), the layout of weight rows
        return x[0].permute(0, 2, 1).reshape(heads * dim, length)

    permuted = interleave_rotary_rows(as_rows(q), heads).reshape(heads, dim // 2, 2, length)
    even, odd = permuted[:, :, 0], permuted[:, :, 1]
    c, s = angles.T.cos()[None], angles.T.sin()[None]  # angle of pair j at each position: (1, dim/2, length)
    interleaved = torch.stack([even * c - odd * s, odd * c + even * s], dim=2).reshape(heads * dim, length)
    torch.testing.assert_close(interleave_rotary_rows(as_rows(rotated), heads), interleaved)


def test_mixtral_expert_gate_up_lora_is_split_into_llama_cpp_gate_and_up_tensors(tmp_path):
    base_dir = save_tiny_model(tmp_path / "base", "mixtral")
    make_lora(base_dir, tmp_path / "lora", [], target_parameters=["mlp.experts.gate_up_proj"])
    assert main(["export-gguf", str(tmp_path / "lora"), str(tmp_path / "m.gguf"), "--base", str(base_dir)]) == 0
    _, tensors = _read(tmp_path / "m.gguf")
    factors = _peft_factors(tmp_path / "lora")
    experts, rank, inter = 4, 4, 128
    peft_a = factors["model.layers.1.mlp.experts.lora_A.weight"]  # (E·r, hidden), rows e·r + k
    peft_b = factors["model.layers.1.mlp.experts.lora_B.weight"]  # (2·inter, r·E), columns k·E + e
    for half, short in enumerate(("ffn_gate_exps", "ffn_up_exps")):
        a, b = tensors[f"blk.1.{short}.weight.lora_a"], tensors[f"blk.1.{short}.weight.lora_b"]
        assert a.shape == (experts, rank, 64) and b.shape == (experts, inter, rank)
        for expert in range(experts):
            np.testing.assert_array_equal(a[expert], peft_a[rank * expert:rank * (expert + 1)])
            np.testing.assert_array_equal(b[expert], peft_b[half * inter:(half + 1) * inter, expert::experts])
    assert not any("gate_up" in name for name in tensors)
