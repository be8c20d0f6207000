"""Negative queue: FIFO order, out-of-place writes (backward after enqueue works), 50 training steps, exact
InfoNCE with queued negatives, state_dict round trip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from craft.errors import UserError
from craft.losses import InfoNCELoss
from craft.negatives import NegativeQueue


def _rows(start: int, n: int, dim: int = 3) -> torch.Tensor:
    return torch.arange(start, start + n, dtype=torch.float32)[:, None].repeat(1, dim)


def test_fifo_keeps_the_newest_entries_oldest_first():
    queue = NegativeQueue(5)
    assert queue.negatives() is None and len(queue) == 0
    queue.enqueue(_rows(0, 3))
    assert torch.equal(queue.ordered(), _rows(0, 3))
    queue.enqueue(_rows(3, 4))  # 7 entries pushed, capacity 5: 2..6 stay
    assert len(queue) == 5
    assert torch.equal(queue.ordered(), _rows(2, 5))
    queue.enqueue(_rows(10, 8))  # more than the capacity at once: the last 5
    assert torch.equal(queue.ordered(), _rows(13, 5))
    assert sorted(queue.negatives()[:, 0].tolist()) == [13, 14, 15, 16, 17]


def test_enqueue_never_modifies_a_handed_out_tensor():
    queue = NegativeQueue(4)
    queue.enqueue(_rows(0, 4))
    handed_out = queue.negatives()
    before, version = handed_out.clone(), handed_out._version
    queue.enqueue(_rows(100, 2))
    assert torch.equal(handed_out, before) and handed_out._version == version


def test_backward_after_enqueue_of_the_same_embeddings():
    torch.manual_seed(0)
    encoder = torch.nn.Linear(6, 4)
    infonce = InfoNCELoss(0.1, learnable_temperature=True)
    queue = NegativeQueue(8)
    queue.enqueue(torch.randn(5, 4))
    anchors, positives = encoder(torch.randn(3, 6)), encoder(torch.randn(3, 6))
    loss = infonce(anchors, positives, negatives=queue.negatives())
    queue.enqueue(positives)  # after the loss, before backward (MoCo order)
    loss.backward()
    assert encoder.weight.grad is not None and torch.isfinite(encoder.weight.grad).all()
    assert not queue.negatives().requires_grad


def test_infonce_with_queued_negatives_matches_closed_form():
    gen = torch.Generator().manual_seed(1)
    anchors, positives, queued = (torch.randn(n, 4, generator=gen) for n in (3, 3, 5))
    queue = NegativeQueue(16)
    queue.enqueue(queued)
    loss = InfoNCELoss(0.2)(anchors, positives, negatives=queue.negatives())
    a, c = F.normalize(anchors, dim=-1), F.normalize(torch.cat([positives, queued]), dim=-1)
    logits = a @ c.T / 0.2
    expected = -(logits.diagonal()[:3] - torch.logsumexp(logits, dim=1)).mean()
    assert torch.allclose(loss, expected, atol=1e-6)


def test_queue_trains_fifty_steps():
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.1), torch.nn.Linear(16, 4))
    infonce = InfoNCELoss(0.1, learnable_temperature=True)
    optimizer = torch.optim.Adam(list(encoder.parameters()) + list(infonce.parameters()), lr=1e-2)
    queue = NegativeQueue(32)
    data = torch.randn(64, 8)
    losses = []
    for step in range(50):
        rows = data[(step * 4) % 64:(step * 4) % 64 + 4]
        anchors = encoder(rows + 0.05 * torch.randn_like(rows))
        positives = encoder(rows + 0.05 * torch.randn_like(rows))
        loss = infonce(anchors, positives, negatives=queue.negatives())
        queue.enqueue(positives)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert len(queue) == 32
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-10:]) < sum(losses[:10])


def test_state_dict_round_trip_gives_identical_contents_and_future():
    queue = NegativeQueue(6)
    queue.enqueue(_rows(0, 4))
    queue.enqueue(_rows(4, 5))  # wrapped around
    state = queue.state_dict()
    restored = NegativeQueue(6)
    restored.load_state_dict(state)
    assert torch.equal(restored.ordered(), queue.ordered())
    queue.enqueue(_rows(50, 2))
    restored.enqueue(_rows(50, 2))
    assert torch.equal(restored.ordered(), queue.ordered())
    empty = NegativeQueue(6)
    empty.load_state_dict(NegativeQueue(6).state_dict())
    assert empty.negatives() is None


def test_queue_errors_name_the_setting():
    with pytest.raises(UserError, match="craft_negative_queue_size"):
        NegativeQueue(0)
    queue = NegativeQueue(4)
    queue.enqueue(torch.zeros(2, 3))
    with pytest.raises(UserError, match="3-dim"):
        queue.enqueue(torch.zeros(2, 5))
    with pytest.raises(UserError, match="capacity 4"):
        NegativeQueue(8).load_state_dict(queue.state_dict())


def test_trainer_queue_trains_fifty_steps_and_resumes_identically(tmp_path):
    from craft_scale_helpers import craft_trainer
    from craft.testing import tiny_model
    from craft.trainers import CRAFT_STATE_NAME

    small = dict(hidden_size=32, num_layers=1)  # 50 steps: the smallest model that still has every part
    trainer = craft_trainer(tmp_path, model=tiny_model("llama", **small), craft_negative_strategy="queue",
                            craft_negative_queue_size=16, craft_beta=0.5, max_steps=50, save_strategy="steps",
                            save_steps=50, learning_rate=1e-3)
    trainer.train()
    assert trainer.state.global_step == 50
    losses = [e["loss/craft_contrast"] for e in trainer.state.log_history if "loss/craft_contrast" in e]
    assert len(losses) == 25 and all(torch.isfinite(torch.tensor(losses)))
    accuracies = [e["metrics/craft_contrastive_accuracy"] for e in trainer.state.log_history
                  if "metrics/craft_contrastive_accuracy" in e]
    assert len(trainer.craft_queue) == 16
    checkpoint = tmp_path / "checkpoint-50"
    assert (checkpoint / CRAFT_STATE_NAME).is_file()
    resumed = craft_trainer(tmp_path / "resumed", model=tiny_model("llama", **small), craft_negative_strategy="queue",
                            craft_negative_queue_size=16)
    assert resumed.craft_queue.negatives() is None
    resumed._load_from_checkpoint(str(checkpoint))
    assert torch.equal(resumed.craft_queue.ordered(), trainer.craft_queue.ordered())
    assert accuracies  # logged with [B, B + N] logits
