"""GradCache: gradients of the model, projection head and temperature equal the single-graph InfoNCE gradients
(1e-5) with dropout on, for several chunk sizes, with queue negatives, loss weights and accumulation."""

from __future__ import annotations

import pytest
import torch

from craft.gradcache import RNGState, gradcache_backward, split_into_chunks
from craft.errors import UserError
from craft.hooks import LastHiddenStateCapture
from craft.losses import InfoNCELoss, ProjectionHead, pool_hidden_states
from craft.testing import tiny_model

BATCH, HIDDEN, DIM = 6, 64, 16


def _setup(dropout: float):
    model = tiny_model("llama", attention_dropout=dropout)
    model.train()
    torch.manual_seed(5)
    head = ProjectionHead(HIDDEN, DIM, dropout=dropout).train()
    infonce = InfoNCELoss(0.1, learnable_temperature=True, pooling="last_token")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 384, (2 * BATCH, 9), generator=gen)
    lengths = torch.randint(3, 10, (2 * BATCH,), generator=gen)
    mask = (torch.arange(9)[None, :] < lengths[:, None]).long()
    return model, head, infonce, ids, mask


def _encoder(model):
    def encode(chunk):
        ids, mask = chunk
        with LastHiddenStateCapture(model) as capture:
            model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
        return pool_hidden_states(capture.hidden, mask, "last_token")
    return encode


def _loss_fn(head, infonce, negatives=None):
    def loss_fn(representations):
        emb = head(representations)
        loss, logits = infonce(emb[:BATCH], emb[BATCH:], negatives=negatives, return_logits=True)
        return loss, logits
    return loss_fn


def _chunks(ids, mask, size):
    return [(ids[s], mask[s]) for s in split_into_chunks(ids.shape[0], size)]


def _params(model, head, infonce):
    return list(model.parameters()) + list(head.parameters()) + list(infonce.parameters())


def _grads(params):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def _zero(params):
    for p in params:
        p.grad = None


def _reference(model, head, infonce, ids, mask, size, weight=1.0, negatives=None):
    """One graph over every chunk (the same chunking, hence the same dropout draws), then backward."""
    encode = _encoder(model)
    reps = torch.cat([encode(chunk) for chunk in _chunks(ids, mask, size)])
    loss, _ = _loss_fn(head, infonce, negatives)(reps)
    (loss * weight).backward()
    return loss.detach()


def _max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize("chunk_size", [1, 4, 12])
def test_gradcache_equals_single_graph_with_dropout(chunk_size):
    model, head, infonce, ids, mask = _setup(dropout=0.3)
    params = _params(model, head, infonce)
    torch.manual_seed(123)
    ref_loss = _reference(model, head, infonce, ids, mask, chunk_size)
    ref = _grads(params)
    after_ref = torch.rand(3)
    _zero(params)
    torch.manual_seed(123)
    loss, logits = gradcache_backward(_encoder(model), _chunks(ids, mask, chunk_size), _loss_fn(head, infonce))
    after_gc = torch.rand(3)
    assert torch.allclose(loss, ref_loss, atol=1e-6)
    assert logits.shape == (BATCH, BATCH)
    got = _grads(params)
    assert _max_diff(got, ref) < 1e-5
    # every part received a gradient: model, head, temperature
    assert float(model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum()) > 0
    assert float(head.fc1.weight.grad.abs().sum()) > 0
    assert float(infonce.log_temperature.grad.abs()) > 0
    # the RNG continues exactly where the single-graph computation leaves it
    assert torch.equal(after_ref, after_gc)


def test_dropout_is_active_so_replay_matters():
    """The same batch with other dropout draws gives other gradients: the equality above is not trivial."""
    model, head, infonce, ids, mask = _setup(dropout=0.3)
    params = _params(model, head, infonce)
    torch.manual_seed(123)
    _reference(model, head, infonce, ids, mask, 4)
    first = _grads(params)
    _zero(params)
    torch.manual_seed(124)
    _reference(model, head, infonce, ids, mask, 4)
    assert _max_diff(first, _grads(params)) > 1e-3


def test_gradcache_without_dropout_matches_one_full_batch_forward():
    model, head, infonce, ids, mask = _setup(dropout=0.0)
    params = _params(model, head, infonce)
    _reference(model, head, infonce, ids, mask, size=2 * BATCH)  # one chunk = the plain full batch
    ref = _grads(params)
    _zero(params)
    gradcache_backward(_encoder(model), _chunks(ids, mask, 5), _loss_fn(head, infonce))
    assert _max_diff(_grads(params), ref) < 1e-5


def test_gradcache_with_queue_negatives_weight_and_accumulation():
    model, head, infonce, ids, mask = _setup(dropout=0.3)
    params = _params(model, head, infonce)
    negatives = torch.randn(10, DIM, generator=torch.Generator().manual_seed(9))
    torch.manual_seed(7)
    _reference(model, head, infonce, ids, mask, 4, weight=0.3, negatives=negatives)
    ref = _grads(params)
    _zero(params)
    for _ in range(2):  # accumulation: two identical micro-batches add up
        torch.manual_seed(7)
        gradcache_backward(_encoder(model), _chunks(ids, mask, 4), _loss_fn(head, infonce, negatives), loss_weight=0.3)
    assert _max_diff(_grads(params), [2 * g for g in ref]) < 1e-5


def test_gradcache_differentiable_loss_weight():
    """A weight with a graph (uncertainty balancing's exp(-s)) gets d(w * L)/ds = L * dw/ds."""
    model, head, infonce, ids, mask = _setup(dropout=0.0)
    s = torch.tensor(0.4, requires_grad=True)
    loss, _ = gradcache_backward(_encoder(model), _chunks(ids, mask, 4), _loss_fn(head, infonce),
                                 loss_weight=torch.exp(-s))
    assert torch.allclose(s.grad, -torch.exp(-s.detach()) * loss, atol=1e-6)


def test_no_sync_wraps_all_chunks_but_the_last():
    model, head, infonce, ids, mask = _setup(dropout=0.0)
    entered = []

    class Recorder:
        def __enter__(self):
            entered.append(True)

        def __exit__(self, *exc):
            return False

    gradcache_backward(_encoder(model), _chunks(ids, mask, 5), _loss_fn(head, infonce), no_sync=Recorder)
    assert len(entered) == 2  # 12 rows in chunks of 5: 3 chunks, the last one syncs


def test_rng_state_restore_replays_random_numbers():
    state = RNGState()
    first = torch.rand(4)
    state.restore()
    assert torch.equal(first, torch.rand(4))


def test_split_into_chunks():
    assert split_into_chunks(7, 3) == [slice(0, 3), slice(3, 6), slice(6, 7)]
    with pytest.raises(UserError, match="craft_gradcache_chunk_size"):
        split_into_chunks(4, 0)


# --------------------------------------------------------------------------------------------- in the trainer


@pytest.mark.parametrize("strategy", ["paired_dataset", "self_align"])
def test_trainer_gradcache_step_equals_plain_step(strategy, tmp_path):
    """One window (an SFT and a contrastive micro-batch): GradCache and the plain path give the same gradients."""
    from craft_scale_helpers import step_gradients, window

    kinds = ["sft", "contrastive"]
    batches = window(kinds)
    if strategy == "self_align":  # self-align contrastive micro-batches are chat rows with labels
        batches[1] = {**window(["sft", "sft"], seed=21)[1], "craft_batch_type": "contrastive"}
    from craft_scale_helpers import craft_trainer

    grads = {}
    for gradcache in (False, True):
        trainer = craft_trainer(tmp_path, strategy, craft_use_gradcache=gradcache, craft_gradcache_chunk_size=1,
                                craft_learnable_temperature=True, gradient_accumulation_steps=2)
        grads[gradcache] = torch.cat([g.flatten() for g in step_gradients(trainer, [dict(b) for b in batches])])
    error = float((grads[True] - grads[False]).norm() / grads[False].norm())
    assert error < 1e-5
