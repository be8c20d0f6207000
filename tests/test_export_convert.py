"""`craft convert`: Control Adapter -> PEFT LoRA, checked against the adapter's own forward (logits)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from craft.cli import main
from test_export_fixtures import adapter_logits, make_control_adapter, peft_logits

EXACT_CASES = [  # (family, target, type): every family where the conversion is exact
    ("llama", "sublayers", "lowrank"),
    ("mistral", "sublayers", "symmetric"),
    ("mixtral", "sublayers", "lowrank"),
    ("qwen2", "sublayers", "symmetric"),
    ("qwen3", "sublayers", "lowrank"),
    ("phi3", "sublayers", "lowrank"),
    ("cohere", "block", "symmetric"),  # parallel block: block and sublayer targets coincide
    ("cohere2", "sublayers", "lowrank"),
]


@pytest.mark.parametrize("family,target,kind", EXACT_CASES)
def test_convert_is_exact_for_both_directions(tmp_path, capsys, family, target, kind):
    base_dir, adapter_dir, model = make_control_adapter(tmp_path, family, target=target, type=kind)
    for direction, strength in ((1, 1.0), (-1, 0.7)):
        out = tmp_path / f"lora{direction}"
        assert main(["convert", str(adapter_dir), str(out), "--direction", str(direction),
                     "--strength", str(strength)]) == 0
        assert "exact" in capsys.readouterr().out
        expected = adapter_logits(model, direction, strength)
        got = peft_logits(base_dir, out)
        assert (expected - adapter_logits(model, 0)).abs().max() > 0.05  # the adapter changes the logits
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    config = json.loads((tmp_path / "lora1" / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] == 4 and not config["use_rslora"]


def test_convert_follows_the_neumann_inverse_on_a_layer_subset(tmp_path):
    base_dir, adapter_dir, model = make_control_adapter(tmp_path, "llama", inverse="neumann", neumann_order=2,
                                                        layers_to_transform=[1])
    assert main(["convert", str(adapter_dir), str(tmp_path / "lora"), "--direction", "-1"]) == 0
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.o_proj"]
    torch.testing.assert_close(peft_logits(base_dir, tmp_path / "lora"), adapter_logits(model, -1), atol=1e-4, rtol=0)


def test_block_target_on_a_sequential_block_keeps_the_better_measured_rule(tmp_path, capsys):
    base_dir, adapter_dir, model = make_control_adapter(tmp_path, "llama", target="block")
    assert main(["convert", str(adapter_dir), str(tmp_path / "lora")]) == 0
    text = capsys.readouterr().out
    candidates = {rule: float(value) for rule, value in re.findall(r"block rule '(\w+)': effect error ([0-9.e+-]+)", text)}
    assert set(candidates) == {"all", "mlp"}
    kept, _ = _printed_errors(text)
    assert kept == min(candidates.values())
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    expected = {"all": 4, "mlp": 2}[min(candidates, key=candidates.get)]  # LoRA'd projections over 2 layers
    assert len(config["target_modules"]) == expected
    assert (peft_logits(base_dir, tmp_path / "lora") - adapter_logits(model)).abs().max() > 1e-3  # not exact


def _printed_errors(text: str) -> tuple[float, float]:
    match = re.search(r"conversion is approximate .* effect error ([0-9.e+-]+), logit error ([0-9.e+-]+)", text)
    assert match, text
    return float(match.group(1)), float(match.group(2))


@pytest.mark.parametrize("family,target", [("gemma2", "sublayers"), ("llama", "block")])
def test_approximate_conversion_prints_the_error_it_has(tmp_path, capsys, family, target):
    from craft.export.convert import probe_input_ids

    base_dir, adapter_dir, model = make_control_adapter(tmp_path, family, target=target)
    assert main(["convert", str(adapter_dir), str(tmp_path / "lora"), "--direction", "-1"]) == 0
    effect, logit = _printed_errors(capsys.readouterr().out)
    ids = probe_input_ids(model.config.vocab_size)
    adapted = adapter_logits(model, -1, ids=ids)
    miss = (peft_logits(base_dir, tmp_path / "lora", ids=ids) - adapted).norm()
    assert effect == pytest.approx(float(miss / (adapted - adapter_logits(model, 0, ids=ids)).norm()), rel=1e-4)
    assert logit == pytest.approx(float(miss / adapted.norm()), rel=1e-4)
    assert 0 < effect < 1  # an approximation that captures most of the adapter's effect


def test_gemma2_conversion_accounts_for_the_post_sublayer_norm_gain(tmp_path, capsys):
    """With non-trivial post-norm gains the norm-aware update G⁻¹·T·G·P beats the plain T·P."""
    from safetensors.torch import load_file, save_file

    from craft.export.checkpoint import BaseCheckpoint
    from craft.export.control import read_control_adapter_file, transforms
    from craft.export.convert import measure_logits_error

    base_dir, adapter_dir, _ = make_control_adapter(tmp_path, "gemma2")
    weights = load_file(base_dir / "model.safetensors")
    generator = torch.Generator().manual_seed(3)
    for name in weights:
        if "post_attention_layernorm" in name or "post_feedforward_layernorm" in name:
            weights[name] = torch.rand(weights[name].shape, generator=generator) * 2 - 0.5  # gains in [0.5, 2.5)
    save_file(weights, base_dir / "model.safetensors", metadata={"format": "pt"})
    assert main(["convert", str(adapter_dir), str(tmp_path / "aware")]) == 0
    aware, _ = _printed_errors(capsys.readouterr().out)
    # the plain alternative, written by hand: additive factors A·P, s·B on each projection
    adapter, base = read_control_adapter_file(adapter_dir), BaseCheckpoint.open(base_dir)
    plain = {}
    for layer, update in transforms(adapter, 1, 1.0).items():
        for projection in adapter.family.residual_projections:
            name = base.projection_key(layer, projection)
            plain[name] = update.to_additive(base.get_tensor(name))
    from craft.export.lora import write_lora

    write_lora(plain, tmp_path / "plain", str(base_dir))
    naive = measure_logits_error(str(base_dir), str(adapter_dir), str(tmp_path / "plain"))["effect_error"]
    assert aware < naive


@pytest.mark.parametrize("family,kind", [("qwen2", "symmetric"), ("mixtral", "lowrank")])
def test_multiplicative_mode_is_refused_by_peft_and_merges_exactly(tmp_path, family, kind):
    from peft import PeftModel

    from craft.testing import tiny_model
    from test_export_fixtures import plain_logits

    base_dir, adapter_dir, model = make_control_adapter(tmp_path, family, type=kind)
    out = tmp_path / "mult"
    assert main(["convert", str(adapter_dir), str(out), "--mode", "multiplicative", "--direction", "-1"]) == 0
    with pytest.raises(KeyError, match="peft_type"):  # no peft_type: PEFT cannot mistake it for an additive LoRA
        PeftModel.from_pretrained(tiny_model(family), str(out))
    assert main(["merge", str(base_dir), str(out), str(tmp_path / "merged")]) == 2  # needs --multiplicative
    assert main(["merge", str(base_dir), str(out), str(tmp_path / "merged"), "--multiplicative"]) == 0
    torch.testing.assert_close(plain_logits(tmp_path / "merged"), adapter_logits(model, -1), atol=1e-4, rtol=0)


def test_convert_user_errors(tmp_path, capsys):
    base_dir, adapter_dir, _ = make_control_adapter(tmp_path, "llama")
    cases = {
        "does not exist": [str(tmp_path / "missing"), str(tmp_path / "o1")],
        "missing": [str(base_dir), str(tmp_path / "o2")],  # a model dir, not an adapter
        "--base": [str(adapter_dir), str(tmp_path / "o3"), "--base", str(tmp_path / "nowhere")],
    }
    for needle, argv in cases.items():
        assert main(["convert", *argv]) == 2
        assert needle in capsys.readouterr().err
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("precious")
    assert main(["convert", str(adapter_dir), str(tmp_path / "o5"), "--strength", "nan"]) == 2
    assert "--strength" in capsys.readouterr().err
    assert main(["convert", str(adapter_dir), str(occupied)]) == 2
    assert "--force" in capsys.readouterr().err and (occupied / "keep.txt").read_text() == "precious"
    assert main(["convert", str(adapter_dir), str(occupied), "--force"]) == 0
    assert not (occupied / "keep.txt").exists() and (occupied / "adapter_model.safetensors").is_file()
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    (adapter_dir / "adapter_config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    assert main(["convert", str(adapter_dir), str(tmp_path / "o4")]) == 2
    assert "gpt2" in capsys.readouterr().err
