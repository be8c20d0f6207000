"""The `craft_*` keys contrastive-ft 0.4.3 had and this package lacked, each shown to take effect in a trainer:
craft_assistant_mask_strategy, craft_contrastive_keys, craft_gradient_clip_per_task / craft_gradient_clip_value,
craft_gradnorm_alpha, craft_loss_scale_momentum, craft_debug."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from craft_scale_helpers import COLLATE, craft_trainer, pair_rows, step_gradients, trainable, window
from datasets import Dataset

from craft.data import make_craft_datasets
from craft.errors import UserError
from craft.balancing_step import clip_to_norm


def _logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def test_assistant_mask_strategy_selects_the_positive_span(tmp_path):
    rows = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9], "assistant_mask": [0, 0, 0, 1, 1]},
            {"input_ids": [5, 6, 7, 8], "labels": [-100, 6, 7, 8], "assistant_mask": [0, 0, 1, 1]}]
    with_column = COLLATE(rows)
    without_column = {k: v for k, v in with_column.items() if k != "assistant_mask"}
    auto = craft_trainer(tmp_path, "self_align", craft_assistant_mask_strategy="auto")
    _, positive = auto._self_align_masks(with_column)  # auto: the column when the batch has it ...
    assert positive.long().tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 1, 0]]
    _, positive = auto._self_align_masks(without_column)  # ... else labels != -100
    assert positive.long().tolist() == [[0, 0, 1, 1, 1], [0, 1, 1, 1, 0]]
    provided = craft_trainer(tmp_path, "self_align", craft_assistant_mask_strategy="provided")
    assert provided._self_align_masks(with_column)[1].long().tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 1, 0]]
    with pytest.raises(UserError, match="'provided' needs the 'assistant_mask' column"):
        provided._self_align_masks(without_column)
    with pytest.raises(UserError, match="craft_assistant_mask_strategy='none' leaves self_align"):
        craft_trainer(tmp_path, "self_align", craft_assistant_mask_strategy="none")


def test_contrastive_keys_read_renamed_columns(tmp_path):
    renamed = [{"query": row["input_ids"], "doc": row["input_ids_tgt"]} for row in pair_rows(8, seed=2)]
    keys = {"anchor_input_ids": "query", "positive_input_ids": "doc"}
    with pytest.raises(UserError, match="no 'input_ids' column"):
        make_craft_datasets(renamed, contrastive_dataset=renamed)
    canonical = craft_trainer(tmp_path / "a", gradient_accumulation_steps=2, max_steps=2)
    custom = craft_trainer(tmp_path / "b", gradient_accumulation_steps=2, max_steps=2, craft_contrastive_keys=keys,
                           contrastive_rows=renamed)
    with pytest.raises(UserError, match="no 'query' column"):  # the trainer checks the bundle against the keys
        craft_trainer(tmp_path / "c", craft_contrastive_keys=keys)
    canonical.train()
    custom.train()
    # the same rows under other names: the same contrastive losses, step for step
    assert _logged(custom, "loss/craft_contrast") == pytest.approx(_logged(canonical, "loss/craft_contrast"))
    assert len(_logged(custom, "loss/craft_contrast")) == 2
    batch = {"query": torch.ones(2, 3, dtype=torch.long), "doc": torch.ones(2, 2, dtype=torch.long),
             "craft_batch_type": "craft"}
    assert set(custom._craft_canonical(batch)) == {"input_ids", "input_ids_tgt", "craft_batch_type"}


def test_gradient_clip_per_task_clips_each_task_before_adding(tmp_path):
    batches = window(["sft", "contrastive"])
    plain = craft_trainer(tmp_path, gradient_accumulation_steps=2)
    micro_batches, num_items = plain.get_batch_samples(iter([dict(b) for b in batches]), 2, plain.args.device)
    plain.current_gradient_accumulation_steps = 2
    task_grads = []
    for batch in micro_batches:  # the same window weights, one task at a time
        plain.training_step(plain.model, batch, num_items)
        task_grads.append(torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel())
                                     for p in trainable(plain)]))
        for p in trainable(plain):
            p.grad = None
    g_sft, g_con = task_grads
    value = 0.5 * min(float(g_sft.norm()), float(g_con.norm()))  # both tasks are clipped
    clipped = craft_trainer(tmp_path, gradient_accumulation_steps=2, craft_gradient_clip_per_task=True,
                            craft_gradient_clip_value=value)
    got = torch.cat([g.flatten() for g in step_gradients(clipped, [dict(b) for b in batches])])
    expected = g_sft * (value / g_sft.norm()) + g_con * (value / g_con.norm())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert float(clip_to_norm(g_sft, 1e9).sub(g_sft).abs().max()) == 0.0  # below the limit: unchanged


def test_loss_scale_momentum_sets_the_running_mean(tmp_path):
    trainer = craft_trainer(tmp_path, craft_gradient_balancing="loss_scale", craft_loss_scale_momentum=0.25,
                            gradient_accumulation_steps=2, max_steps=3)
    trainer.train()
    sft, weights = _logged(trainer, "loss/craft_sft"), _logged(trainer, "balancing/craft_weight_sft")
    assert trainer.craft_balancing.balancer.momentum == 0.25
    # m = L1 after step 1, then 0.25 * L1 + 0.75 * L2: step 3 runs with 0.6 / m
    assert weights[2] == pytest.approx(0.6 / (0.25 * sft[0] + 0.75 * sft[1]), rel=1e-5)


@pytest.mark.parametrize("gamma", [3.0])
def test_gradnorm_alpha_is_the_asymmetry_of_the_update(tmp_path, gamma):
    trainer = craft_trainer(tmp_path, craft_gradient_balancing="gradnorm", craft_gradnorm_alpha=gamma,
                            gradient_accumulation_steps=2, max_steps=2)
    balancer = trainer.craft_balancing.balancer
    calls, update = [], balancer.update

    def recording_update(losses, norms):
        calls.append((list(losses), list(norms), balancer.weights.clone()))
        return update(losses, norms)

    balancer.update = recording_update
    trainer.train()
    assert balancer.alpha == gamma and len(calls) == 2
    (first, _, _), (losses, norms, w) = calls
    relative = torch.tensor(losses, dtype=torch.float64) / torch.tensor(first, dtype=torch.float64)
    norms = torch.tensor(norms, dtype=torch.float64)
    target = (w * norms).mean() * (relative / relative.mean()) ** gamma
    new = (w - 0.025 * torch.sign(w * norms - target) * norms).clamp_min(1e-3)
    torch.testing.assert_close(balancer.weights, 2 * new / new.sum())


def test_debug_logs_each_window(tmp_path, caplog):
    trainer = craft_trainer(tmp_path, gradient_accumulation_steps=2, max_steps=1, craft_debug=True)
    with caplog.at_level(logging.INFO, logger="craft.trainers"):
        trainer.train()
    opened = [r.getMessage() for r in caplog.records if "micro-batches [" in r.getMessage()]
    assert len(opened) == 1
    found = re.search(r"N_sft=(\d+) tokens, M_con=(\d+) InfoNCE terms .*weight ([\d.e-]+) per SFT token, "
                      r"([\d.e-]+) per InfoNCE term", opened[0])
    n_sft, m_con, w_sft, w_con = int(found[1]), int(found[2]), float(found[3]), float(found[4])
    assert m_con == 1 and w_con == pytest.approx(0.4) and w_sft == pytest.approx(0.6 / n_sft, rel=1e-5)
    closed = [r.getMessage() for r in caplog.records if "loss/craft_total=" in r.getMessage()]
    assert len(closed) == 1 and f"loss/craft_sft={_logged(trainer, 'loss/craft_sft')[0]:.6g}" in closed[0]
    quiet = craft_trainer(tmp_path, gradient_accumulation_steps=2, max_steps=1)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="craft.trainers"):
        quiet.train()
    assert not [r for r in caplog.records if "CRAFT debug" in r.getMessage()]


def test_original_trainer_arguments_loader_factory_and_contrastive_collator(tmp_path):
    from torch.utils.data import DataLoader

    from craft.config import CRAFTSFTConfig
    from craft.testing import make_tokenizer, tiny_model
    from craft.trainers import CRAFTSFTTrainer
    from craft_scale_helpers import chat_rows

    sft, pairs = chat_rows(8, seed=1), pair_rows(8, seed=2)
    sft_loader = DataLoader(sft, batch_size=4, collate_fn=COLLATE)
    contrastive_loader = DataLoader(pairs, batch_size=2, collate_fn=COLLATE)
    args = CRAFTSFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], craft_beta=0.5,
                          craft_projection_dim=16)
    common = dict(model=tiny_model("llama"), args=args, train_dataset=Dataset.from_list(sft),
                  contrastive_dataset=Dataset.from_list(pairs), data_collator=COLLATE,
                  processing_class=make_tokenizer())
    trainer = CRAFTSFTTrainer(**common, craft_loader_factory=lambda t: (sft_loader, contrastive_loader))
    mixed = trainer.build_craft_mixed_loader()
    assert mixed.sft_loader is sft_loader and mixed.contrastive_loader is contrastive_loader
    assert (mixed.num_sft_batches, mixed.num_contrastive_batches) == (2, 4)

    def tagging(rows):
        return {**COLLATE(rows), "collated_by": torch.ones(len(rows))}

    trainer = CRAFTSFTTrainer(**{**common, "model": tiny_model("llama")}, craft_collator=tagging)
    batches = list(trainer.build_craft_mixed_loader())
    assert all(("collated_by" in b) == (b["craft_batch_type"] == "craft") for b in batches)
    with pytest.raises(UserError, match="craft_loader_factory must return"):
        CRAFTSFTTrainer(**{**common, "model": tiny_model("llama")},
                        craft_loader_factory=lambda t: sft_loader).build_craft_mixed_loader()


def test_head_pooling_and_mask_key_reach_the_objective(tmp_path):
    """craft_projection_dim / _dropout, craft_pooling, craft_temperature and craft_assistant_mask_key in one
    self-align trainer: the objective is built from them and the mask column is read under its name."""
    from craft.losses import pool_hidden_states

    trainer = craft_trainer(tmp_path, "self_align", craft_projection_dim=8, craft_projection_dropout=0.5,
                            craft_pooling="mean", craft_temperature=0.2, craft_assistant_mask_key="span")
    objective = trainer.craft_objective
    assert objective.projection.net[3].out_features == 8 and objective.projection.net[2].p == 0.5
    pooled = torch.randn(4, 64)
    objective.train()
    assert not torch.equal(objective.project(pooled), objective.project(pooled))  # dropout active in training
    objective.eval()
    assert torch.equal(objective.project(pooled), objective.project(pooled))
    hidden, mask = torch.randn(2, 5, 64), torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
    torch.testing.assert_close(objective.pool(hidden, mask), pool_hidden_states(hidden, mask, "mean"))
    assert float(objective.infonce.temperature) == pytest.approx(0.2)
    batch = {"input_ids": torch.ones(1, 4, dtype=torch.long), "labels": torch.tensor([[-100, 1, 1, 1]]),
             "span": torch.tensor([[0, 0, 0, 1]])}
    assert trainer._self_align_masks(batch)[1].long().tolist() == [[0, 0, 0, 1]]  # the column, not the labels
