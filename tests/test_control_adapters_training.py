"""Control Adapters in training: class-0 aux loss, Trainer routing, save/load, 4-bit base, a toy steering run."""

import math

import pytest
import torch

from craft.adapters import (
    ControlAdapterConfig, add_control_adapters, control_adapters, control_aux_loss, control_class,
    load_control_adapter, read_control_adapter, save_control_adapter, set_control_classes,
)
from craft.errors import UserError
from craft.testing import make_tokenizer, save_tiny_model, tiny_model, toy_texts
from test_control_adapters import randomize_adapters
from test_control_adapters_families import INPUT_IDS, adapted

LAMBDA0 = 0.7


def capture_writes(model):
    """Record the residual writes (self_attn / mlp outputs) of every layer, after the adapter hooks ran."""
    writes = {}
    for adapter in control_adapters(model):
        layer = model.model.layers[adapter.layer_index]
        for name in ("self_attn", "mlp"):
            layer.get_submodule(name).register_forward_hook(
                lambda m, a, out, key=(adapter.layer_index, name): writes.__setitem__(
                    key, out[0] if isinstance(out, tuple) else out))
    return writes


def hand_aux(model, writes, neutral):
    """LAMBDA0 * mean over adapters of mean over (write, neutral token) of ||W d||^2 / ||d||^2."""
    per_adapter = []
    for adapter in control_adapters(model):
        w = adapter.weight_matrix()
        ratios = [((d @ w.T).pow(2).sum(-1) / d.pow(2).sum(-1))[neutral]
                  for (i, _), d in writes.items() if i == adapter.layer_index]
        per_adapter.append(torch.cat(ratios).mean())
    return LAMBDA0 * torch.stack(per_adapter).mean()


def test_aux_loss_matches_hand_computation_and_its_gradient():
    model = adapted("llama", class0_lambda=LAMBDA0)
    writes = capture_writes(model)
    model(INPUT_IDS, control_classes=0)
    aux = control_aux_loss(model)
    expected = hand_aux(model, writes, torch.ones(INPUT_IDS.shape, dtype=torch.bool))
    torch.testing.assert_close(aux, expected, rtol=1e-5, atol=0)
    assert aux > 0
    params = [p for a in control_adapters(model) for p in a.parameters()]
    grads = torch.autograd.grad(aux, params, retain_graph=True)
    expected_grads = torch.autograd.grad(expected, params)
    for grad, reference in zip(grads, expected_grads):
        assert grad.abs().max() > 0
        torch.testing.assert_close(grad, reference, rtol=1e-4, atol=1e-7)


def test_aux_loss_counts_only_unpadded_neutral_positions():
    model = adapted("llama", class0_lambda=LAMBDA0)
    writes = capture_writes(model)
    classes = torch.tensor([[0, 0, 1, -1, 0, 0, 1, 0, 0, 0], [1, 0, 0, 0, -1, 0, 0, 0, 0, 0]])
    attention_mask = torch.ones_like(INPUT_IDS)
    attention_mask[1, 7:] = 0  # right padding in row 1
    model(INPUT_IDS, attention_mask=attention_mask, control_classes=classes)
    expected = hand_aux(model, writes, (classes == 0) & attention_mask.bool())
    torch.testing.assert_close(control_aux_loss(model), expected, rtol=1e-5, atol=0)
    model(INPUT_IDS, control_classes=1)
    assert control_aux_loss(model).item() == 0.0
    assert control_aux_loss(adapted("llama")).item() == 0.0  # lambda0 = 0


def test_set_control_classes_on_a_single_layer():
    model = adapted("llama")
    layer = model.model.layers[1]
    set_control_classes(layer, -1)
    assert model.model.layers[1].control_adapter.classes == -1
    assert model.model.layers[0].control_adapter.classes is None
    with pytest.raises(UserError, match="-1, 0 or 1"):
        set_control_classes(layer, torch.tensor([[2]]))


def test_control_classes_column_through_a_plain_trainer_step(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments, default_data_collator

    model = adapted("llama")
    rows = {"input_ids": INPUT_IDS.tolist(), "labels": INPUT_IDS.tolist(),
            "control_classes": [[1] * 10, [-1] * 5 + [0] * 5]}
    with torch.no_grad():
        expected_loss = model(INPUT_IDS, labels=INPUT_IDS, control_classes=torch.tensor(rows["control_classes"])).loss
        all_plus_loss = model(INPUT_IDS, labels=INPUT_IDS, control_classes=1).loss
    assert abs(expected_loss - all_plus_loss) > 1e-3  # the column matters
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, learning_rate=1e-3,
                             remove_unused_columns=False, use_cpu=True, bf16=False, report_to="none",
                             save_strategy="no", logging_steps=1, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict(rows),
                      data_collator=default_data_collator)
    before = model.model.layers[0].control_adapter.B.detach().clone()
    trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] == pytest.approx(expected_loss.item(), rel=1e-5)
    assert not torch.equal(model.model.layers[0].control_adapter.B, before)


@pytest.mark.parametrize("kind", ["lowrank", "symmetric"])
def test_save_load_round_trip_gives_identical_logits(tmp_path, kind):
    model = adapted("qwen3", type=kind, layers_to_transform=[1], target="block")
    save_control_adapter(model, tmp_path / "ca")
    settings, tensors = read_control_adapter(tmp_path / "ca")
    names = ("A", "B") if kind == "lowrank" else ("Q", "S")
    assert sorted(tensors) == sorted(f"layers.1.control_{n}" for n in names)
    assert settings["adapter_type"] == "control_adapter" and settings["model_type"] == "qwen3"
    assert settings["layers"] == [1] and settings["hidden_size"] == 64 and settings["target"] == "block"
    assert settings["scale"] == pytest.approx(1 / math.sqrt(4) if kind == "lowrank" else 1.0)
    loaded = load_control_adapter(tiny_model("qwen3"), tmp_path / "ca")
    for value in (1, -1):
        with control_class(model, value), control_class(loaded, value):
            assert torch.equal(loaded(INPUT_IDS).logits, model(INPUT_IDS).logits)


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_control_adapter(tiny_model("llama"), tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="adapter_config.json"):
        read_control_adapter(tmp_path / "empty")
    save_control_adapter(adapted("llama"), tmp_path / "ca")
    with pytest.raises(UserError, match="hidden_size"):
        load_control_adapter(tiny_model("llama", hidden_size=32), tmp_path / "ca")
    with pytest.raises(UserError, match="is for 2 layers, but the model has 3"):
        load_control_adapter(tiny_model("llama", num_layers=3), tmp_path / "ca")
    with pytest.raises(UserError, match="model type"):
        load_control_adapter(tiny_model("mistral"), tmp_path / "ca")
    with pytest.raises(UserError, match="no control adapters"):
        save_control_adapter(tiny_model("llama"), tmp_path / "none")


def test_four_bit_base_trains_fp32_adapters(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = save_tiny_model(tmp_path / "llama", "llama")
    quantized = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantized)
    assert type(model.model.layers[0].self_attn.o_proj).__name__ == "Linear4bit"
    add_control_adapters(model, ControlAdapterConfig(rank=4, class0_lambda=0.1))
    randomize_adapters(model)
    loss = model(INPUT_IDS, labels=INPUT_IDS, control_classes=torch.tensor([[1] * 10, [-1] * 5 + [0] * 5])).loss
    (loss + control_aux_loss(model)).backward()
    adapters = list(control_adapters(model))
    assert len(adapters) == 2
    for adapter in adapters:
        assert adapter.A.dtype == torch.float32 and adapter.A.grad.abs().max() > 0 and adapter.B.grad.abs().max() > 0
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".control_adapter." not in n)


def _batch(tokenizer, texts):
    encoded = tokenizer([tokenizer.bos_token + t for t in texts], padding=True, return_tensors="pt")
    labels = encoded.input_ids.masked_fill(encoded.attention_mask == 0, -100)
    return encoded.input_ids, encoded.attention_mask, labels


def _loss(model, batch, value):
    input_ids, attention_mask, labels = batch
    return model(input_ids, attention_mask=attention_mask, labels=labels, control_classes=value).loss


def test_toy_steering_run_lowers_both_held_out_losses():
    """+1 on pirate text and -1 on formal text: afterwards +1 fits held-out pirate text and -1 held-out formal text
    better than the base model does (the same adapter, used in both directions)."""
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    model = add_control_adapters(tiny_model("llama").train(), ControlAdapterConfig(rank=8))
    train = {1: _batch(tokenizer, toy_texts(16, "pirate", seed=0)), -1: _batch(tokenizer, toy_texts(16, "formal", seed=0))}
    held = {1: _batch(tokenizer, toy_texts(16, "pirate", seed=1)), -1: _batch(tokenizer, toy_texts(16, "formal", seed=1))}
    with torch.no_grad():
        base = {value: _loss(model, batch, value).item() for value, batch in held.items()}  # B = 0: the base model
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(20):
        for value, batch in train.items():
            optimizer.zero_grad()
            _loss(model, batch, value).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        steered = {value: _loss(model, batch, value).item() for value, batch in held.items()}
        crossed = {value: _loss(model, batch, -value).item() for value, batch in held.items()}
    assert steered[1] < base[1] - 0.1 and steered[-1] < base[-1] - 0.1, (base, steered)
    assert steered[1] < crossed[1] and steered[-1] < crossed[-1], (steered, crossed)


def test_gradient_checkpointing_gives_the_same_gradients():
    classes = torch.tensor([[1, 1, 0, -1, 0, 0, 1, -1, -1, 0], [0, -1, 1, 1, 0, 1, -1, 0, 0, 1]])
    grads = []
    for checkpointing in (False, True):
        model = adapted("llama", class0_lambda=LAMBDA0).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        loss = model(INPUT_IDS, labels=INPUT_IDS, control_classes=classes, use_cache=False).loss
        (loss + control_aux_loss(model)).backward()
        grads.append([p.grad.clone() for a in control_adapters(model) for p in a.parameters()])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-7)


def test_bfloat16_adapters_on_a_bfloat16_base():
    model = add_control_adapters(tiny_model("llama", dtype=torch.bfloat16), ControlAdapterConfig(rank=4, dtype="bfloat16"))
    assert torch.equal(model(INPUT_IDS).logits, tiny_model("llama", dtype=torch.bfloat16)(INPUT_IDS).logits)
    randomize_adapters(model)
    model(INPUT_IDS, labels=INPUT_IDS, control_classes=-1).loss.backward()
    adapter = model.model.layers[0].control_adapter
    assert adapter.A.dtype == torch.bfloat16 and adapter.B.grad.dtype == torch.bfloat16
    assert adapter.B.grad.abs().max() > 0


def test_float32_adapters_on_a_bfloat16_base():
    """Default fp32 adapters on a bf16 base: identity at init, and the +1 transform is computed in fp32 from the
    bf16 write and rounded once: each write equals bf16(fp32(write) @ (I + W)^T) to one bf16 rounding."""
    model = add_control_adapters(tiny_model("llama", dtype=torch.bfloat16), ControlAdapterConfig(rank=4))
    assert torch.equal(model(INPUT_IDS).logits, tiny_model("llama", dtype=torch.bfloat16)(INPUT_IDS).logits)
    randomize_adapters(model)
    adapter = model.model.layers[0].control_adapter
    raw = {}
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, a, out: raw.__setitem__("write", out))
    transformed = {}
    model.model.layers[0].mlp.register_forward_hook(lambda m, a, out: transformed.__setitem__("write", out))
    model(INPUT_IDS, labels=INPUT_IDS).loss.backward()
    expected = (raw["write"].float() @ (torch.eye(64) + adapter.weight_matrix()).T).to(torch.bfloat16)
    assert transformed["write"].dtype == torch.bfloat16
    # equal up to one bf16 rounding step (fp32 summation order may differ)
    torch.testing.assert_close(transformed["write"].float(), expected.float(), rtol=2 ** -7, atol=1e-6)
    unrounded = raw["write"].float() @ (torch.eye(64) + adapter.weight_matrix()).T
    assert (transformed["write"].float() - unrounded).abs().max() <= unrounded.abs().max() * 2 ** -8
    assert adapter.A.dtype == torch.float32 and adapter.B.grad.dtype == torch.float32 and adapter.B.grad.abs().max() > 0
