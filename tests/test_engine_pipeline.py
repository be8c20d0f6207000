"""The pipeline model equals the HF model: forward for every family, Control Adapters, aux-loss gradients."""

from __future__ import annotations

import pytest
import torch
from test_engine_fixtures import write_model

from craft.engine.config import TrainConfig
from craft.engine.loss import causal_lm_loss
from craft.engine.model import check_model_dir, load_stage
from craft.engine.pipeline import AuxLossMeter, sequential_logits, sequential_loss
from craft.testing import FAMILIES


def make_config(model_dir, **keys) -> TrainConfig:
    settings = dict(model_dir=str(model_dir), output_dir="unused", lora_rank=4, lr=1e-3, sequence_len=32,
                    model_dtype="float32", datasets=[{"dataset_path": "unused"}])
    settings.update(keys)
    return TrainConfig(**settings)


def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def logits_loss(logits, labels):
    """The plain token-mean next-token loss of given logits (B, S, V)."""
    return causal_lm_loss(logits, labels, lambda x: x, chunk_size=0)


def token_batch(seed=0, batch=2, length=24):
    return torch.randint(4, 384, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_equals_hf_for_every_family(tmp_path, family):
    model_dir = write_model(tmp_path / family, family)
    config = make_config(model_dir, full_fine_tune=True, lora_rank=None)
    check_model_dir(config)  # the header-only preflight accepts every family's checkpoint layout
    stage = load_stage(config, 0, 1)
    ids = token_batch()
    with torch.no_grad():
        ours, reference = sequential_logits(stage, ids), hf_model(model_dir)(ids).logits
    assert reference.abs().max() > 0.1
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_sharded_checkpoint_and_stage_loading(tmp_path):
    model_dir = tmp_path / "sharded"
    from craft.testing import save_tiny_model

    save_tiny_model(model_dir, "llama", max_shard_size="40KB")
    assert (model_dir / "model.safetensors.index.json").is_file()
    config = make_config(model_dir, full_fine_tune=True, lora_rank=None)
    with torch.no_grad():
        ours = sequential_logits(load_stage(config, 0, 1), token_batch())
        torch.testing.assert_close(ours, hf_model(model_dir)(token_batch()).logits, atol=1e-5, rtol=1e-5)
    # Two stages over [embed, layer0, layer1, head]: stage 0 reads only the embedding and layer 0.
    first, second = load_stage(config, 0, 2), load_stage(config, 1, 2)
    assert not first.base.model.layers[0].self_attn.q_proj.weight.is_meta
    assert first.base.model.layers[1].self_attn.q_proj.weight.is_meta and first.base.lm_head.weight.is_meta
    assert second.base.model.embed_tokens.weight.is_meta and not second.base.lm_head.weight.is_meta


def test_lora_initialisation_does_not_depend_on_stages(tmp_path):
    model_dir = write_model(tmp_path / "llama")
    config = make_config(model_dir)
    one = dict(load_stage(config, 0, 1).model.named_parameters())
    two = dict(load_stage(config, 1, 2).model.named_parameters())
    name = "base_model.model.model.layers.1.mlp.down_proj.lora_A.default.weight"
    assert torch.equal(one[name], two[name]) and one[name].abs().sum() > 0


def test_4bit_layers_are_quantized(tmp_path):
    import bitsandbytes as bnb

    model_dir = write_model(tmp_path / "llama")
    stage = load_stage(make_config(model_dir, load_in_4bit=True), 0, 1)
    q_proj = stage.base.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit) and q_proj.base_layer.weight.dtype == torch.uint8
    with torch.no_grad():
        ours, reference = sequential_logits(stage, token_batch()), hf_model(model_dir)(token_batch()).logits
    relative = (ours - reference).norm() / reference.norm()
    assert 0 < relative < 0.3  # NF4 rounding error, not a different model


def _copy_adapters(source, target):
    from craft.adapters import control_adapters

    for a, b in zip(control_adapters(source), control_adapters(target)):
        b.load_state_dict(a.state_dict())


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_control_adapter_forward_and_aux_gradient_match_single_model(tmp_path, family):
    """Pipeline items (classes passed along, aux attached per layer by AttachAuxLoss) give the same loss and the
    same adapter gradients as the HF model with adapters: d(CE + mean-over-adapters aux)/d(adapter)."""
    from craft.adapters import ControlAdapterConfig, add_control_adapters, control_adapters, control_aux_loss

    model_dir = write_model(tmp_path / family, family)
    config = make_config(model_dir, use_control_adapters=True, control_class0_lambda=0.5)
    stage = load_stage(config, 0, 1)
    torch.manual_seed(1)
    for adapter in control_adapters(stage.base):
        torch.nn.init.normal_(adapter.B, std=0.3)  # B = 0 would make the aux loss and its gradient vanish
    reference = hf_model(model_dir)
    add_control_adapters(reference, ControlAdapterConfig(rank=4, class0_lambda=0.5))
    _copy_adapters(stage.base, reference)

    ids = token_batch()
    classes = torch.tensor([[1] * 8 + [0] * 8 + [-1] * 8, [0] * 12 + [1] * 12])
    labels = ids.clone()
    meter = AuxLossMeter(scale=1.0, num_adapters=stage.num_layers)
    stage.base.train()
    ours = sequential_loss(stage, ids, labels, classes, aux_meter=meter)
    ours.backward()

    out = reference(ids, control_classes=classes)  # the model's routing hook hands classes to every adapter
    aux = control_aux_loss(reference)
    assert aux > 1e-4
    (logits_loss(out.logits, labels) + aux).backward()

    torch.testing.assert_close(ours, logits_loss(out.logits, labels), atol=1e-5, rtol=1e-5)
    assert meter.pop() == pytest.approx(float(aux), rel=1e-5)
    for a, b in zip(control_adapters(stage.base), control_adapters(reference)):
        torch.testing.assert_close(a.A.grad, b.A.grad, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(a.B.grad, b.B.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("eval_first", [False, True])
def test_qlora_gradients_equal_those_of_the_dequantized_model(tmp_path, eval_first):
    """Backward through NF4 layers: LoRA gradients equal those with the dequantized weights in float Linears —
    also after an eval pass (eval mode, no grad), which on AVX512-BF16 CPUs made bitsandbytes repack the weights
    into an inference layout whose kernel has no autograd."""
    import bitsandbytes as bnb

    model_dir = write_model(tmp_path / "llama")
    stage = load_stage(make_config(model_dir, load_in_4bit=True), 0, 1)
    for name, param in stage.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    ids = token_batch(batch=1)
    if eval_first:
        stage.model.eval()
        with torch.no_grad():
            sequential_logits(stage, ids)
        stage.model.train()
        packed = [m for m in stage.model.modules() if isinstance(m, bnb.nn.Linear4bit)
                  and getattr(m.weight.quant_state, "packing_format_for_cpu", False)]
        assert not packed

    def lora_grads():
        stage.model.zero_grad()
        sequential_loss(stage, ids, ids).backward()
        return {n: p.grad.clone() for n, p in stage.model.named_parameters() if p.requires_grad}

    quantized = lora_grads()
    for module in list(stage.model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                linear = torch.nn.Linear(child.in_features, child.out_features, bias=False)
                linear.weight = torch.nn.Parameter(
                    bnb.functional.dequantize_4bit(child.weight.data, child.weight.quant_state), requires_grad=False)
                setattr(module, child_name, linear)
    dequantized = lora_grads()
    assert quantized.keys() == dequantized.keys() and len(quantized) == 28  # 2 layers x 7 maps x (A, B)
    for name in quantized:
        torch.testing.assert_close(quantized[name], dequantized[name], atol=1e-6, rtol=1e-4)


def test_topologies_place_stages_and_replicas():
    """Default: data axis fastest (ranks 0,1 = stage 0 of replicas 0,1); column-major: pipe axis fastest."""
    from craft.engine.distributed import make_topology, stage_and_replica
    from craft.errors import UserError

    default = make_topology(num_stages=2, world_size=4, column_major=False)
    column = make_topology(num_stages=2, world_size=4, column_major=True)
    assert [stage_and_replica(default, r) for r in range(4)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [stage_and_replica(column, r) for r in range(4)] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    with pytest.raises(UserError, match="evenly divide"):
        make_topology(num_stages=3, world_size=4, column_major=False)


def test_full_fine_tune_of_tied_embeddings_needs_one_stage(tmp_path):
    from craft.errors import UserError

    model_dir = write_model(tmp_path / "cohere", "cohere")  # Cohere ties lm_head to the embedding
    config = make_config(model_dir, full_fine_tune=True, lora_rank=None)
    with pytest.raises(UserError, match="tied input/output embeddings needs pipeline_stages = 1"):
        load_stage(config, 0, 2)
    stage = load_stage(config, 0, 1)
    assert stage.base.lm_head.weight is stage.base.model.embed_tokens.weight
