"""contrastive-ft 0.4.3's public API: every name of its ``__all__`` at top level and at its module path, each called
with the original's documented arguments and checked against a number (closed forms, references)."""

import importlib
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import craft
from craft.testing import tiny_model

ORIGINAL_ALL = [  # contrastive-ft 0.4.3, craft/__init__.py
    "InfoNCELoss", "ProjectionHead", "pool_hidden_states", "CRAFTConfigMixin", "CRAFTSFTConfig", "CRAFTORPOConfig",
    "CRAFTGRPOConfig", "CRAFTPPOConfig", "CRAFTDPOConfig", "CRAFT_PRESETS", "get_preset", "auto_configure",
    "CRAFTDatasetBundle", "CRAFTCollator", "CRAFTMixedDataLoader", "make_craft_datasets",
    "compute_contrastive_accuracy", "compute_representation_consistency", "update_representation_reference",
    "CRAFTSFTTrainer", "CRAFTORPOTrainer", "CRAFTGRPOTrainer", "CRAFTPPOTrainer", "CRAFTDPOTrainer",
    "CRAFTTrainerMixin", "CRAFTGradientAccumulator", "AccumulationScales", "compute_batch_distribution",
    "LastHiddenStateHook", "get_backbone", "GradCacheContrastiveLoss", "GradCacheConfig", "CachedEmbeddingBank",
    "GradientBalancer", "LossScaleBalancer", "UncertaintyWeightingBalancer", "GradNormBalancer", "PCGradBalancer",
    "create_gradient_balancer",
]
MODULES = {"losses": 3, "config": 9, "data": 4, "metrics": 3, "trainers": 6, "accumulator": 3, "hooks": 2,
           "gradcache": 3, "gradient_balancing": 6}  # the original's module of each name, in __all__ order


def _module_of(index: int) -> str:
    for module, count in MODULES.items():
        if index < count:
            return module
        index -= count
    raise IndexError(index)


def test_import_craft_is_light_and_exports_the_original_names():
    code = "import sys, craft; print(sorted(m for m in ('torch', 'transformers', 'trl') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
    assert list(craft._EXPORTS) == ORIGINAL_ALL
    for index, name in enumerate(ORIGINAL_ALL):
        module = importlib.import_module(f"craft.{_module_of(index)}")
        if name == "CRAFTPPOTrainer" and not hasattr(importlib.import_module("trl"), "PPOTrainer"):
            with pytest.raises(ImportError, match="TRL 1.x removed PPO"):
                getattr(craft, name)
            continue
        assert getattr(craft, name) is getattr(module, name), name
    namespace = {}
    exec("from craft import *", namespace)
    assert set(ORIGINAL_ALL) - set(namespace) <= {"CRAFTPPOTrainer"}


def _hidden_batch():
    gen = torch.Generator().manual_seed(0)
    hidden_a, hidden_p = torch.randn(3, 5, 8, generator=gen), torch.randn(3, 5, 8, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0]])
    return hidden_a, hidden_p, mask


def test_losses_with_the_original_arguments():
    hidden_a, hidden_p, mask = _hidden_batch()
    loss_fn = craft.InfoNCELoss(temperature=0.2, reduction="mean", hidden_size=8, projection_dim=4,
                                pooling="last_token", learnable_temperature=True, dropout=0.0)
    assert isinstance(loss_fn.log_temperature, torch.nn.Parameter) and isinstance(loss_fn.projector,
                                                                                    craft.ProjectionHead)
    loss, details = loss_fn(hidden_a, hidden_p, mask, mask, return_details=True)
    pooled_a = craft.pool_hidden_states(hidden_a, mask, "last_token")
    torch.testing.assert_close(pooled_a, hidden_a[torch.arange(3), torch.tensor([2, 4, 3])])
    a, p = F.normalize(loss_fn.projector.net(pooled_a), dim=-1), details["positive_embeddings"]
    logits = a @ p.T / 0.2
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.arange(3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(details["logits"], logits, rtol=1e-5, atol=1e-5)
    assert float(details["temperature"]) == pytest.approx(0.2)
    by_name = loss_fn(hidden_states_anchor=hidden_a, hidden_states_positive=hidden_p, mask_anchor=mask,
                      mask_positive=mask)  # the original's keyword names
    torch.testing.assert_close(by_name, loss.detach())
    w = torch.tensor([1.0, 2.0, 0.0, 4.0, 8.0])
    weighted = craft.pool_hidden_states(hidden_states=hidden_a, attention_mask=mask, strategy="weighted_mean",
                                        weights=w)
    torch.testing.assert_close(weighted[1], (w[:, None] * hidden_a[1]).sum(0) / w.sum())
    torch.testing.assert_close(weighted[0], (w[:3, None] * hidden_a[0, :3]).sum(0) / 3.0)
    pooled_p = craft.pool_hidden_states(hidden_p, mask, "last_token")
    torch.testing.assert_close(loss_fn.forward_from_pooled(pooled_a, pooled_p), loss.detach())
    extra = F.normalize(torch.randn(2, 4), dim=-1)
    with_negatives = loss_fn(hidden_a, hidden_p, mask, mask, additional_negatives=extra)
    expected = F.cross_entropy(torch.cat([logits, a @ extra.T / 0.2], 1), torch.arange(3))
    torch.testing.assert_close(with_negatives, expected, rtol=1e-5, atol=1e-6)
    per_row = craft.InfoNCELoss(temperature=0.2, reduction="none", hidden_size=8)(hidden_a, hidden_p, mask, mask)
    assert per_row.shape == (3,)
    fixed = craft.InfoNCELoss(temperature=0.05)
    assert "log_temperature" in dict(fixed.named_buffers()) and fixed.projector is None
    fixed(hidden_a, hidden_p, mask, mask)  # builds its projector from the hidden size (the original's lazy head)
    assert fixed.projector.fc1.in_features == 8 and fixed.projector.fc2.out_features == 256

    head = craft.ProjectionHead(input_dim=8, hidden_dim=16, output_dim=4, dropout=0.0)
    assert head.net[0].out_features == 16 and torch.allclose(head(pooled_a).norm(dim=-1), torch.ones(3))
    from craft.losses import _pool_hidden_states, combine_craft_losses

    assert _pool_hidden_states is craft.pool_hidden_states
    out = combine_craft_losses(sft_loss=torch.tensor(2.0), contrastive_loss=torch.tensor(1.0), alpha=0.25)
    assert float(out.total_loss) == 1.25 and float(out.sft_loss) == 2.0 and float(out.contrastive_loss) == 1.0
    assert float(combine_craft_losses(sft_loss=torch.tensor(2.0), contrastive_loss=torch.tensor(1.0),
                                      alpha=1.5).total_loss) == 2.0


def test_configs_presets_and_auto_configure():
    config = craft.CRAFTSFTConfig(output_dir="o", use_cpu=True, report_to=[], craft_assistant_mask_strategy="auto",
                                  craft_pooling="mean", craft_report_metrics=["contrastive_accuracy"],
                                  craft_beta_mode="auto", craft_length_strategy="cap", craft_debug=True,
                                  craft_contrastive_keys={"positive_input_ids": "doc_ids"},
                                  craft_gradient_clip_per_task=True, craft_gradient_clip_value=0.5,
                                  craft_gradnorm_alpha=2.0, craft_loss_scale_momentum=0.9)
    assert isinstance(config, craft.CRAFTConfigMixin) and config.craft_beta == 0.6
    assert config.craft_contrastive_keys["positive_input_ids"] == "doc_ids"
    assert config.craft_contrastive_keys["anchor_input_ids"] == "input_ids"  # the rest keep their defaults
    for cls in (craft.CRAFTORPOConfig, craft.CRAFTGRPOConfig, craft.CRAFTDPOConfig, craft.CRAFTPPOConfig):
        assert cls.from_preset(preset="aggressive", output_dir="o", use_cpu=True).craft_gradnorm_alpha == 1.5
    assert craft.get_preset("balanced") == craft.CRAFT_PRESETS["balanced"]
    assert craft.get_preset("balanced") is not craft.CRAFT_PRESETS["balanced"]
    with pytest.raises(ValueError, match="Unknown preset"):
        craft.get_preset("fast")
    settings = craft.auto_configure(model=tiny_model("llama", hidden_size=512), sft_dataset=list(range(1000)),
                                    contrastive_dataset=list(range(3000)), available_memory_gb=64)
    assert settings["craft_projection_dim"] == 128  # 512 // 4
    assert settings["craft_beta"] == pytest.approx(0.3)  # 125 SFT vs 375 contrastive batches: 0.25, clamped
    assert craft.auto_configure(available_memory_gb=12)["craft_gradcache_chunk_size"] == 2


def test_data_names_with_the_original_arguments():
    rows = [{"input_ids": [i, i + 1], "attention_mask": [1, 1], "input_ids_tgt": [i + 5], "labels": [-100, 1]}
            for i in range(8)]
    bundle = craft.make_craft_datasets(rows, contrastive_dataset=rows, strategy="paired_dataset")
    assert isinstance(bundle, craft.CRAFTDatasetBundle) and bundle.strategy == "paired_dataset"
    batch = craft.CRAFTCollator()(rows[:2])
    assert batch["input_ids"].tolist() == [[0, 1], [1, 2]] and batch["attention_mask_tgt"].tolist() == [[1], [1]]
    sft = [craft.CRAFTCollator()([row]) for row in rows]
    mixed = craft.CRAFTMixedDataLoader(sft, sft[:2], beta=0.75, gradient_accumulation_steps=4, beta_mode="fixed",
                                       length_strategy="oversample", total_sft_batches=8, total_craft_batches=2)
    kinds = [b["craft_batch_type"] for b in mixed]
    assert kinds[:4] == ["sft", "sft", "sft", "craft"] and kinds.count("sft") == 8
    capped = craft.CRAFTMixedDataLoader(sft, sft[:2], beta=0.5, length_strategy="cap", total_sft_batches=3,
                                        total_craft_batches=2)
    assert [b["craft_batch_type"] for b in capped] == ["sft", "craft", "sft", "craft", "sft"]


def test_metrics_accumulator_and_hooks():
    anchor = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
    positives = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert float(craft.compute_contrastive_accuracy(anchor, positives)) == pytest.approx(2 / 3)
    reference = torch.tensor([1.0, 0.0])
    expected = (1.0 + 0.0 + 1.0 / math.sqrt(1.01)) / 3
    assert float(craft.compute_representation_consistency(anchor, reference)) == pytest.approx(expected)
    assert math.isnan(float(craft.compute_representation_consistency(anchor, None)))
    updated = craft.update_representation_reference(reference, anchor, momentum=0.5)
    torch.testing.assert_close(updated, 0.5 * reference + 0.5 * anchor.mean(0))

    acc = craft.CRAFTGradientAccumulator(alpha=0.6, gradient_accumulation_steps=8, n_sft=5, n_contrastive=3)
    scales = acc.scales
    assert isinstance(scales, craft.AccumulationScales)
    assert (scales.sft_scale, scales.contrastive_scale) == pytest.approx((0.12, 0.4 / 3))
    assert float(acc.scale_contrastive_loss(torch.tensor(3.0))) == pytest.approx(0.4)
    assert craft.compute_batch_distribution(beta=0.6, gradient_accumulation_steps=5) == (3, 2)
    assert craft.compute_batch_distribution(beta=0.9, gradient_accumulation_steps=4) == (3, 1)

    model = tiny_model("llama")
    assert craft.get_backbone(model) is model.model
    ids = torch.randint(4, 300, (2, 6))
    with craft.LastHiddenStateHook(model) as hook:
        out = model(input_ids=ids, output_hidden_states=True)
        torch.testing.assert_close(hook.get(), out.hidden_states[-1])
    assert not hook.is_attached and hook.get_optional() is None


def _pool_last(hidden, mask):
    return craft.pool_hidden_states(hidden, mask, "last_token")


def test_gradcache_module_gives_full_batch_gradients_and_bank():
    assert craft.GradCacheConfig() == craft.GradCacheConfig(chunk_size=4, temperature=0.05, use_amp=True,
                                                            sync_gradients=True)
    model = tiny_model("llama")
    projector = craft.ProjectionHead(input_dim=64, output_dim=16)
    gen = torch.Generator().manual_seed(3)
    ids_a, ids_p = torch.randint(4, 300, (6, 7), generator=gen), torch.randint(4, 300, (6, 7), generator=gen)
    mask = torch.ones(6, 7, dtype=torch.long)
    module = craft.GradCacheContrastiveLoss(backbone=craft.get_backbone(model), projector=projector,
                                            pooling_fn=_pool_last, config=craft.GradCacheConfig(chunk_size=2,
                                                                                                 temperature=0.1))
    loss, anchor_emb, _ = module(ids_a, mask, ids_p, mask, return_embeddings=True)
    params = list(model.model.parameters()) + list(projector.parameters())
    got = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    hidden = model.model(input_ids=torch.cat([ids_a, ids_p]), attention_mask=torch.cat([mask, mask])).last_hidden_state
    emb = F.normalize(projector(_pool_last(hidden, torch.cat([mask, mask]))), dim=-1)
    reference = F.cross_entropy(emb[:6] @ emb[6:].T / 0.1, torch.arange(6))
    reference.backward()
    assert float(loss) == pytest.approx(float(reference), rel=1e-5)
    assert max(float((g - p.grad).abs().max()) for g, p in zip(got, params)) < 1e-5
    assert torch.allclose(anchor_emb.norm(dim=-1), torch.ones(6))

    bank = craft.CachedEmbeddingBank(embedding_dim=4, bank_size=5)
    assert bank.get_negatives().shape == (0, 4) and bank.size == 0
    rows = torch.arange(28, dtype=torch.float32).view(7, 4)
    bank.enqueue(rows[:3])
    bank.enqueue(rows[3:])
    assert bank.is_full and bank.size == 5
    assert sorted(bank.get_negatives()[:, 0].tolist()) == [8.0, 12.0, 16.0, 20.0, 24.0]  # the 5 newest
    bank.clear()
    assert bank.size == 0 and not bank.is_full


def test_gradient_balancers_with_the_original_arguments():
    names, device = ["sft", "contrastive"], torch.device("cpu")
    assert craft.create_gradient_balancer("none", names, device) is None
    loss_scale = craft.create_gradient_balancer("loss_scale", names, device, momentum=0.5)
    assert isinstance(loss_scale, (craft.LossScaleBalancer, craft.GradientBalancer)) and loss_scale.momentum == 0.5
    loss_scale.compute_weights({"sft": torch.tensor(2.0), "contrastive": torch.tensor(8.0)})
    weights = loss_scale.compute_weights({"sft": torch.tensor(4.0), "contrastive": torch.tensor(8.0)})
    # running means 3 and 8: 1/3 and 1/8, normalised to sum 2
    assert weights["sft"] == pytest.approx(2 * (1 / 3) / (1 / 3 + 1 / 8))
    loss_scale.step()
    assert loss_scale._step == 1

    uncertainty = craft.UncertaintyWeightingBalancer(names, device, initial_log_var=math.log(2.0))
    assert uncertainty.compute_weights({}) == pytest.approx({"sft": 0.25, "contrastive": 0.25})
    assert float(uncertainty.get_regularization_loss()) == pytest.approx(math.log(2.0))

    gradnorm = craft.create_gradient_balancer("gradnorm", names, device, alpha=1.0)
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    gradnorm.compute_weights({"sft": torch.tensor(1.0), "contrastive": torch.tensor(1.0)})
    gradnorm.compute_weights({"sft": torch.tensor(0.5), "contrastive": torch.tensor(1.0)})
    task_losses = {"sft": (w * torch.tensor([3.0, 0.0])).sum(), "contrastive": (w * torch.tensor([0.0, 1.0])).sum()}
    gn_loss = gradnorm.compute_gradnorm_loss(task_losses, [w])
    # n = [3, 1], G = [3, 1], mean 2; r = [0.5, 1] / 0.75; targets 2 * r = [4/3, 8/3]: |3 - 4/3| + |1 - 8/3|
    assert float(gn_loss) == pytest.approx(5 / 3 + 5 / 3)
    gn_loss.backward()
    assert [float(p.grad) for p in (gradnorm.task_weights["sft"], gradnorm.task_weights["contrastive"])] == \
        pytest.approx([3.0, -1.0])  # sign(G - t) * n

    pc = craft.create_gradient_balancer("pcgrad", names, device)
    assert isinstance(pc, craft.PCGradBalancer) and pc.compute_weights({}) == {"sft": 1.0, "contrastive": 1.0}
    gradients = [torch.tensor([3.0, 4.0]), torch.tensor([-1.0, 0.0])]
    projected = craft.PCGradBalancer.project_conflicting_gradients(gradients)
    assert projected[0].tolist() == [0.0, 4.0] and projected[1].tolist() == pytest.approx([-0.64, 0.48])
    with pytest.raises(ValueError, match="Unknown gradient balancing strategy"):
        craft.create_gradient_balancer("magic", names, device)
