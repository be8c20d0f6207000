"""`craft inspect`: per-layer norms from the factors, checked against dense `torch.linalg` norms of W."""

from __future__ import annotations

import re

import pytest
import torch

from craft.cli import main
from craft.testing import save_tiny_model
from test_export_fixtures import make_control_adapter, make_lora


def _table(text: str) -> dict[str, list[float]]:
    rows = {}
    for line in text.splitlines():
        match = re.match(r"(layer \d+|model\.\S+)\s+(.*)", line)
        if match:
            rows[match.group(1)] = [float(cell) for cell in match.group(2).split()]
    return rows


@pytest.mark.parametrize("kind", ["lowrank", "symmetric"])
def test_inspect_norms_equal_dense_norms(tmp_path, capsys, kind):
    from craft.adapters import control_adapters

    _, adapter_dir, model = make_control_adapter(tmp_path, "llama", type=kind)
    plot = tmp_path / "norms.png"
    assert main(["inspect", str(adapter_dir), "--plot", str(plot)]) == 0
    rows = _table(capsys.readouterr().out)
    assert plot.stat().st_size > 1000
    for adapter in control_adapters(model):
        with torch.no_grad():
            dense = adapter.weight_matrix().double()
        values = rows[f"layer {adapter.layer_index}"]
        fro, spec, margin = values[:3]
        assert fro == pytest.approx(float(torch.linalg.matrix_norm(dense)), rel=1e-5)
        assert spec == pytest.approx(float(torch.linalg.matrix_norm(dense, ord=2)), rel=1e-5)
        assert margin == pytest.approx(1 - spec, abs=1e-5)
        if kind == "symmetric":
            q = adapter.Q.detach().double()
            assert values[3] == pytest.approx(float(torch.linalg.matrix_norm(q.T @ q - torch.eye(4))), rel=1e-5)
            assert values[3] > 0.01  # the fixture's Q is deliberately not orthonormal
        else:
            assert len(values) == 3


def test_inspect_lora_uses_peft_scale(tmp_path, capsys):
    base_dir = save_tiny_model(tmp_path / "base", "llama")
    lora = make_lora(base_dir, tmp_path / "lora", ["o_proj"], use_rslora=True)
    assert main(["inspect", str(tmp_path / "lora")]) == 0
    rows = _table(capsys.readouterr().out)
    layer = lora.get_base_model().model.layers[1].self_attn.o_proj
    with torch.no_grad():
        dense = layer.get_delta_weight("default").double()
    fro, spec = rows["model.layers.1.self_attn.o_proj.weight"]
    assert fro == pytest.approx(float(torch.linalg.matrix_norm(dense)), rel=1e-5)
    assert spec == pytest.approx(float(torch.linalg.matrix_norm(dense, ord=2)), rel=1e-5)


def test_inspect_user_errors(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "absent")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["inspect", str(tmp_path / "empty")]) == 2
    assert "adapter_config.json" in capsys.readouterr().err
