"""`craft merge`: shard-by-shard merging of LoRAs and Control Adapters; the merged model equals the adapted one."""

from __future__ import annotations

import json

import torch

from craft.cli import main
from test_export_fixtures import (adapter_logits, load_base, make_control_adapter, make_lora, plain_logits,
                                  probe_ids)
from craft.testing import save_tiny_model


def _peft_reference(peft_model):
    with torch.no_grad():
        return peft_model(input_ids=probe_ids()).logits


def test_merge_lora_into_a_sharded_model(tmp_path):
    base_dir = save_tiny_model(tmp_path / "base", "llama", max_shard_size="50KB")
    shards = sorted(p.name for p in base_dir.glob("*.safetensors"))
    assert len(shards) > 3
    lora = make_lora(base_dir, tmp_path / "lora", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj", "embed_tokens", "lm_head"],
                     rank_pattern={"down_proj": 2}, alpha_pattern={"o_proj": 3})
    assert main(["merge", str(base_dir), str(tmp_path / "lora"), str(tmp_path / "merged")]) == 0
    merged = tmp_path / "merged"
    assert sorted(p.name for p in merged.glob("*.safetensors")) == shards
    for name in ("model.safetensors.index.json", "config.json", "generation_config.json", "tokenizer.json"):
        assert (merged / name).read_bytes() == (base_dir / name).read_bytes()
    torch.testing.assert_close(plain_logits(merged), _peft_reference(lora), atol=1e-4, rtol=0)


def test_merge_rslora_in_bfloat16_keeps_dtype(tmp_path):
    from safetensors import safe_open

    base_dir = save_tiny_model(tmp_path / "base", "qwen2")
    model = load_base(base_dir).to(torch.bfloat16)
    model.save_pretrained(base_dir)
    lora = make_lora(base_dir, tmp_path / "lora", ["o_proj", "down_proj"], use_rslora=True)
    assert main(["merge", str(base_dir), str(tmp_path / "lora"), str(tmp_path / "merged")]) == 0
    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as handle:
        assert handle.get_tensor("model.layers.0.self_attn.o_proj.weight").dtype == torch.bfloat16
    # reference in float32: base weights (bf16 values) + rsLoRA delta, rounded to bf16 once
    lora_base = lora.get_base_model()
    layer = lora_base.model.layers[1].mlp.down_proj
    expected = (layer.base_layer.weight.float() + layer.get_delta_weight("default").float()).to(torch.bfloat16)
    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as handle:
        torch.testing.assert_close(handle.get_tensor("model.layers.1.mlp.down_proj.weight"), expected, atol=0, rtol=0)


def test_merge_mixtral_expert_loras_into_the_per_expert_disk_layout(tmp_path):
    base_dir = save_tiny_model(tmp_path / "base", "mixtral", max_shard_size="50KB")
    assert any("block_sparse_moe.experts.3.w2" in name for name in
               json.loads((base_dir / "model.safetensors.index.json").read_text())["weight_map"])
    for parameter in ("mlp.experts.down_proj", "mlp.experts.gate_up_proj"):  # gate_up = rows of w1, then of w3
        lora = make_lora(base_dir, tmp_path / parameter, ["o_proj"], target_parameters=[parameter])
        assert main(["merge", str(base_dir), str(tmp_path / parameter), str(tmp_path / f"{parameter}-merged")]) == 0
        torch.testing.assert_close(plain_logits(tmp_path / f"{parameter}-merged"), _peft_reference(lora),
                                   atol=1e-4, rtol=0)


def test_merging_an_approximate_control_adapter_equals_merging_its_conversion(tmp_path):
    """Gemma 2 (norm-aware update, reads the post-norm gains) and a block target: merge == convert then merge."""
    for family, target in (("gemma2", "sublayers"), ("qwen3", "block")):
        base_dir, adapter_dir, _ = make_control_adapter(tmp_path, family, target=target)
        lora, direct, via = (tmp_path / f"{family}-{name}" for name in ("lora", "direct", "via"))
        assert main(["convert", str(adapter_dir), str(lora), "--block-rule", "all"]) == 0
        assert main(["merge", str(base_dir), str(adapter_dir), str(direct), "--block-rule", "all"]) == 0
        assert main(["merge", str(base_dir), str(lora), str(via)]) == 0
        torch.testing.assert_close(plain_logits(direct), plain_logits(via), atol=1e-5, rtol=0)


def test_merge_control_adapter_directly(tmp_path):
    for family, kind in (("llama", "lowrank"), ("mixtral", "symmetric")):
        base_dir, adapter_dir, model = make_control_adapter(tmp_path, family, type=kind, max_shard_size="50KB")
        out = tmp_path / f"{family}-merged"
        assert main(["merge", str(base_dir), str(adapter_dir), str(out), "--direction", "-1",
                     "--strength", "1.5"]) == 0
        torch.testing.assert_close(plain_logits(out), adapter_logits(model, -1, 1.5), atol=1e-4, rtol=0)


def test_merge_refuses_to_overwrite_and_reports_user_errors(tmp_path, capsys):
    base_dir = save_tiny_model(tmp_path / "base", "llama")
    make_lora(base_dir, tmp_path / "lora", ["o_proj"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_text("previous output")
    argv = ["merge", str(base_dir), str(tmp_path / "lora"), str(out)]
    assert main(argv) == 2 and "--force" in capsys.readouterr().err
    assert (out / "model.safetensors").read_text() == "previous output"
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())
    assert main([*argv, "--force"]) == 0
    assert (out / "config.json").is_file()
    failures = {
        "does not exist": ["merge", str(tmp_path / "nope"), str(tmp_path / "lora"), str(tmp_path / "o1")],
        "adapter_config.json": ["merge", str(base_dir), str(base_dir), str(tmp_path / "o2")],
        "is the base model": ["merge", str(base_dir), str(tmp_path / "lora"), str(base_dir)],
        "additive PEFT LoRA": ["merge", str(base_dir), str(tmp_path / "lora"), str(tmp_path / "o3"),
                               "--multiplicative"],
    }
    for needle, argv in failures.items():
        assert main(argv) == 2
        assert needle in capsys.readouterr().err
    wider = save_tiny_model(tmp_path / "wider", "llama", hidden_size=128)
    assert main(["merge", str(wider), str(tmp_path / "lora"), str(tmp_path / "o6")]) == 2
    assert "does not fit" in capsys.readouterr().err
    other = save_tiny_model(tmp_path / "other", "qwen2", num_layers=1)
    assert main(["merge", str(other), str(tmp_path / "lora"), str(tmp_path / "o4")]) == 2
    assert "was trained on a llama model" in capsys.readouterr().err  # the architecture is checked first
    config = json.loads((base_dir / "config.json").read_text())
    (base_dir / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    assert main(["merge", str(base_dir), str(tmp_path / "lora"), str(tmp_path / "o5")]) == 2
    assert "gpt2" in capsys.readouterr().err


def test_streaming_safetensors_writer_and_reader_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    from craft.export.checkpoint import read_stored, shard_entries, write_safetensors

    generator = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=generator).to(torch.bfloat16), "b": torch.tensor(2.5),
               "c": torch.arange(7, dtype=torch.int64), "d": torch.rand(4, generator=generator) > 0.5,
               "e": torch.randn(2, 3, 4, generator=generator, dtype=torch.float16)}
    save_file(tensors, tmp_path / "in.safetensors", metadata={"format": "pt"})
    entries, metadata = shard_entries(tmp_path / "in.safetensors")
    with open(tmp_path / "in.safetensors", "rb") as handle:
        read = {entry.name: read_stored(handle, entry) for entry in entries}
    write_safetensors(tmp_path / "out.safetensors", entries, read.__getitem__, metadata)
    loaded = load_file(tmp_path / "out.safetensors")
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor) and torch.equal(read[name], tensor)
