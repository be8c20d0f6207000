"""Memory features of `craft train` change no number: activation checkpointing (and offload) of every decoder layer
and the chunked loss give the gradients of the plain pipeline (float32, 1e-5), for LoRA, QLoRA, full fine-tuning,
Control Adapters with mixed classes and the class-0 aux loss, dropout, Gemma 2's softcap and Cohere's logit_scale;
and they really do keep less (saved-tensor bytes counted, offload copies observed)."""

from __future__ import annotations

import weakref

import pytest
import torch
from test_engine_fixtures import write_model
from test_engine_pipeline import make_config, token_batch

from craft.engine.loss import causal_lm_loss
from craft.engine.model import load_stage
from craft.engine.pipeline import AuxLossMeter, sequential_loss

MODES = [(True, 0), ("offload", 0), (False, 7), (True, 5), ("offload", 16)]  # (checkpointing, chunk_size)
CLASSES = torch.tensor([[1] * 8 + [0] * 8 + [-1] * 8, [0] * 12 + [-1] * 6 + [1] * 6])


def gradients(stage, ids, labels, classes=None, checkpointing=False, chunk_size=0, seed=0):
    """(loss, aux counted by the meter, {name: grad}) of one micro-batch through the pipeline items."""
    stage.model.zero_grad(set_to_none=True)
    meter = AuxLossMeter(scale=1.0, num_adapters=stage.num_layers) if stage.mode == "control" else None
    torch.manual_seed(seed)  # the same dropout masks in every run
    loss = sequential_loss(stage, ids, labels, classes, meter, checkpointing, chunk_size)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in stage.model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return float(loss), meter.pop() if meter else 0.0, grads


def assert_same_gradients(stage, ids, labels, classes=None, modes=MODES):
    reference = gradients(stage, ids, labels, classes)
    assert max(float(g.abs().max()) for g in reference[2].values()) > 1e-4
    for checkpointing, chunk_size in modes:
        loss, aux, grads = gradients(stage, ids, labels, classes, checkpointing, chunk_size)
        assert loss == pytest.approx(reference[0], rel=1e-6), (checkpointing, chunk_size)
        assert aux == pytest.approx(reference[1], rel=1e-6), (checkpointing, chunk_size)  # counted once
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference[2][name], atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"{name} {checkpointing} {chunk_size}: {m}")


def randomise_adapters(stage, std=0.2):
    """Non-zero B factors, so every gradient (and the aux loss) is non-trivial."""
    torch.manual_seed(3)
    for name, param in stage.model.named_parameters():
        if param.requires_grad and ("lora_B" in name or name.endswith(".B")):
            torch.nn.init.normal_(param, std=std)


def test_lora_with_dropout(tmp_path):
    stage = load_stage(make_config(write_model(tmp_path / "llama"), lora_dropout=0.2), 0, 1)
    stage.model.train()
    randomise_adapters(stage)
    ids = token_batch()
    labels = ids.clone()
    labels[0, :5] = -100
    assert_same_gradients(stage, ids, labels)


def test_control_adapters_mixed_classes_aux_loss_and_dropout(tmp_path):
    config = make_config(write_model(tmp_path / "llama"), use_control_adapters=True, control_class0_lambda=0.5,
                         lora_dropout=0.1)
    stage = load_stage(config, 0, 1)
    stage.model.train()
    randomise_adapters(stage, std=0.3)
    ids = token_batch()
    _, aux, _ = gradients(stage, ids, ids, CLASSES)
    assert aux > 1e-4
    assert_same_gradients(stage, ids, ids, CLASSES)


@pytest.mark.parametrize("family", ["gemma2", "cohere"])
def test_full_fine_tune_with_softcap_or_logit_scale(tmp_path, family):
    """Every weight, lm_head included (Cohere's is tied to the embedding), through Gemma 2's final softcap or
    Cohere's logit_scale."""
    overrides = {"final_logit_softcapping": 2.0} if family == "gemma2" else {"logit_scale": 0.5}
    stage = load_stage(make_config(write_model(tmp_path / family, family, **overrides), full_fine_tune=True,
                                   lora_rank=None), 0, 1)
    assert stage.hf_config.final_logit_softcapping == 2.0 if family == "gemma2" else stage.hf_config.logit_scale == 0.5
    stage.model.train()
    assert_same_gradients(stage, token_batch(), token_batch(), modes=[(True, 7), ("offload", 5)])


def test_lora_on_lm_head_and_qlora(tmp_path):
    model_dir = write_model(tmp_path / "llama")
    stage = load_stage(make_config(model_dir, target_modules=["q_proj", "down_proj", "lm_head"]), 0, 1)
    randomise_adapters(stage)
    assert any("lm_head.lora_A" in n for n, p in stage.model.named_parameters() if p.requires_grad)
    assert_same_gradients(stage, token_batch(), token_batch(), modes=[(True, 7)])
    stage = load_stage(make_config(model_dir, load_in_4bit=True), 0, 1)
    randomise_adapters(stage)
    assert_same_gradients(stage, token_batch(batch=1), token_batch(batch=1), modes=[(True, 0), ("offload", 9)])


def test_chunked_loss_equals_the_plain_loss_with_ignored_tokens():
    """Value and gradients of the chunked loss equal the plain one, for chunks that split rows, chunks of only
    ignored labels, and a chunk size larger than the batch; no counted token gives nan, as the plain loss does."""
    torch.manual_seed(0)
    hidden = torch.randn(3, 10, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    labels = torch.randint(0, 50, (3, 10))
    labels[1] = -100
    labels[2, 4:] = -100

    def run(chunk_size):
        hidden.grad = weight.grad = None
        loss = causal_lm_loss(hidden, labels, lambda h: torch.tanh(h @ weight.T / 3) * 3, chunk_size, [weight])
        loss.backward()
        return loss.detach(), hidden.grad.clone(), weight.grad.clone()

    plain = run(0)
    reference = torch.nn.functional.cross_entropy((torch.tanh(hidden @ weight.T / 3) * 3)[:, :-1].reshape(-1, 50),
                                                  labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(plain[0], reference)
    for chunk_size in (1, 4, 9, 30, 1000):
        for ours, theirs in zip(run(chunk_size), plain):
            torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    assert torch.isnan(causal_lm_loss(hidden, torch.full_like(labels, -100), lambda h: h @ weight.T, 4, [weight]))
    with torch.no_grad():  # evaluation: chunks only summed
        torch.testing.assert_close(causal_lm_loss(hidden, labels, lambda h: torch.tanh(h @ weight.T / 3) * 3, 4,
                                                  [weight]), plain[0], atol=1e-6, rtol=1e-5)
    def tanh_head(h):  # tanh keeps its output (the logits) for backward: the chunk must not overwrite them
        return torch.tanh(h @ weight.T / 3)

    hidden.grad = weight.grad = None
    causal_lm_loss(hidden, labels, tanh_head, 4, [weight]).backward()
    chunked = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    causal_lm_loss(hidden, labels, tanh_head, 0).backward()
    for ours, theirs in zip(chunked, (hidden.grad, weight.grad)):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    head = torch.nn.Linear(8, 50, bias=False)  # a module: its parameters are found without being named
    head.weight.data.copy_(weight.detach())
    hidden.grad = None
    causal_lm_loss(hidden, labels, head, 4).backward()
    reference_weight = torch.autograd.grad(causal_lm_loss(hidden, labels, lambda h: h @ weight.T, 0), weight)[0]
    torch.testing.assert_close(head.weight.grad, reference_weight, atol=1e-6, rtol=1e-5)


def test_chunked_loss_in_bfloat16_equals_the_plain_loss():
    """bf16 logits: the chunk's float32 copy holds the softmax gradient, cast back to bf16 as autograd would."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 12, 16, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(300, 16, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 300, (2, 12))
    labels[0, :3] = -100
    results = []
    for chunk_size in (0, 5):
        hidden.grad = weight.grad = None
        loss = causal_lm_loss(hidden, labels, lambda h: h @ weight.T, chunk_size, [weight])
        loss.backward()
        results.append((loss.detach(), hidden.grad.float(), weight.grad.float()))
    for ours, theirs in zip(results[1], results[0]):
        torch.testing.assert_close(ours, theirs, atol=2e-2, rtol=2e-2)


class SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Bytes of the distinct storages saved for backward while active and still held by the graph afterwards."""

    def __init__(self):
        self.saved = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            self.saved[storage.data_ptr()] = (weakref.ref(tensor), storage.nbytes())
            return tensor

        super().__init__(pack, lambda tensor: tensor)

    @property
    def total(self) -> int:
        return sum(nbytes for ref, nbytes in self.saved.values() if ref() is not None)


def test_checkpointing_keeps_only_layer_inputs_and_offload_copies_them(tmp_path, monkeypatch):
    """Without checkpointing the layers save many (B, S, H)-sized tensors each; with it, the graph holds only each
    layer's inputs (hidden (B, S, H) + classes + mask) and the loss's chunk inputs (views of one (B, S, H) tensor).
    With offload every saved layer input goes through `save_on_cpu` as a fresh copy."""
    stage = load_stage(make_config(write_model(tmp_path / "llama", hidden_size=64, num_layers=4)), 0, 1)
    batch, seq, hidden = 2, 48, 64
    ids = token_batch(batch=batch, length=seq)
    measured = {}
    for mode in (False, True):
        saved = SavedBytes()
        with saved:
            loss = sequential_loss(stage, ids, ids, checkpointing=mode, chunk_size=16)
        measured[mode] = saved.total
        del loss
    activation = batch * seq * hidden * 4
    # checkpointed: 4 layer inputs; the ints (classes, mask) are the same two tensors for every layer; the norm
    # saves its input (the last layer's output) and its normalised output, the embedding its ids; the chunked
    # loss keeps gradients, not saved tensors.
    layer_inputs = 4 * activation + 2 * batch * seq * 8
    assert layer_inputs <= measured[True] <= layer_inputs + 4 * activation
    assert measured[False] > 4 * measured[True]

    copies = []
    real = torch.autograd.graph.save_on_cpu

    class Recording(real):
        def __init__(self, pin_memory=False, device_type="cuda"):
            super().__init__(pin_memory, device_type)
            pack = self.pack_hook

            def recording_pack(tensor):
                device, packed = pack(tensor)
                copies.append((tensor, packed))
                return device, packed

            self.pack_hook = recording_pack

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", Recording)
    sequential_loss(stage, ids, ids, checkpointing="offload", chunk_size=16).backward()
    hidden_copies = [(t, p) for t, p in copies if t.is_floating_point()]
    assert len(copies) == 3 * 4 and len(hidden_copies) == 4
    for tensor, packed in copies:
        assert packed.device.type == "cpu" and torch.equal(packed, tensor)
        assert packed.untyped_storage().data_ptr() != tensor.untyped_storage().data_ptr()  # a real copy
