"""TRL wrappers (DPO, KTO, ORPO, GRPO, RLOO): each trains 3 steps on a tiny model, and the contrastive term's
gradient reaches the model with exactly the weight (1 - alpha) / M; the logged ``loss`` is the optimised
objective (= loss/craft_total = alpha · host + (1 - alpha) · InfoNCE); schedule settings the wrappers cannot honour
are refused; PPO gives a clear error with TRL 1.x."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

import craft.config as config
from craft.data import make_craft_datasets
from craft.hooks import LastHiddenStateCapture
from craft.testing import make_tokenizer, tiny_model

VOCAB = 384
TEXTS = ["the cat sat", "a ship sails", "my friend reads", "the river runs", "our crew sings", "the storm ends",
         "a teacher waits", "the market opens"]  # 8 rows: 4 micro-batches of 2 per epoch


def _pairs(n=8, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return Dataset.from_list([{"input_ids": torch.randint(4, VOCAB, (5,), generator=gen).tolist(),
                               "input_ids_tgt": torch.randint(4, VOCAB, (6,), generator=gen).tolist()}
                              for _ in range(n)])


def _host_dataset(kind: str) -> Dataset:
    if kind in ("DPO", "ORPO"):
        rows = [{"prompt": t, "chosen": " yes indeed", "rejected": " no way"} for t in TEXTS]
    elif kind == "KTO":
        rows = [{"prompt": t, "completion": " yes" if i % 2 else " no", "label": bool(i % 2)}
                for i, t in enumerate(TEXTS)]
    else:  # GRPO, RLOO: prompts only
        rows = [{"prompt": t} for t in TEXTS]
    return Dataset.from_list(rows)


def _reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def _trainer(kind: str, tmp_path, alpha=0.5, beta=0.0, **overrides):
    from craft import trainers

    config_class = getattr(config, f"CRAFT{kind}Config")
    trainer_class = getattr(trainers, f"CRAFT{kind}Trainer")
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=1,
                    max_steps=3, use_cpu=True, report_to=[], bf16=False, logging_steps=1, save_strategy="no",
                    learning_rate=1e-3, seed=0, disable_tqdm=True, craft_projection_dim=16, craft_temperature=0.1,
                    craft_alpha=alpha, craft_beta=beta)
    if kind in ("GRPO", "RLOO"):
        settings.update(num_generations=2, max_completion_length=4, beta=0.0)  # beta 0: no reference model
    settings.update(overrides)
    args = config_class(**settings)
    host_data = _host_dataset(kind)
    bundle = make_craft_datasets(host_data, contrastive_dataset=_pairs(), strategy="paired_dataset")
    kwargs = dict(model=tiny_model("llama"), args=args, train_dataset=host_data, processing_class=make_tokenizer(),
                  craft_bundle=bundle)
    if kind in ("GRPO", "RLOO"):
        kwargs["reward_funcs"] = _reward
    if kind in ("DPO", "KTO"):
        kwargs["ref_model"] = tiny_model("llama")  # a model built in memory has no path to reload it from
    return trainer_class(**kwargs)


def _reference_contrastive_grad(trainer, model, batch, weight, param):
    """weight * InfoNCE of a paired batch, computed here from the model, head and loss (no trainer code path)."""
    modules = trainer.craft_modules
    embeddings = []
    for suffix in ("", "_tgt"):
        ids, mask = batch["input_ids" + suffix], batch["attention_mask" + suffix]
        with LastHiddenStateCapture(model) as capture:
            model(input_ids=ids, attention_mask=mask)
        index = torch.where(mask.bool(), torch.arange(mask.shape[1]), -1).amax(dim=1)
        embeddings.append(modules.projection(capture.hidden[torch.arange(ids.shape[0]), index]))
    a, p = (F.normalize(e, dim=-1) for e in embeddings)
    loss = F.cross_entropy(a @ p.T / 0.1, torch.arange(a.shape[0]))
    return torch.autograd.grad(weight * loss, param)[0]


@pytest.mark.parametrize("kind", ["DPO", "KTO", "ORPO", "GRPO", "RLOO"])
def test_wrapper_trains_and_contrastive_gradient_reaches_the_model(kind, tmp_path):
    trainer = _trainer(kind, tmp_path)
    model = trainer.model
    probe = model.model.layers[0].self_attn.q_proj.weight
    deltas, references = [], []
    original_next, original_step = trainer._craft_next_contrastive_batch, trainer._craft_auxiliary_contrastive
    seen = []

    def next_batch():
        seen.append(original_next())
        return seen[-1]

    def spy(wrapped_model):
        before = probe.grad.clone() if probe.grad is not None else torch.zeros_like(probe)
        weighted = original_step(wrapped_model)
        deltas.append(probe.grad - before)
        if len(deltas) == 1:  # first micro-batch: alpha 0.5, M = 1 contrastive term in the step (GA 1, beta 0: every step)
            references.append(_reference_contrastive_grad(trainer, model, seen[-1], 0.5, probe))
        return weighted

    trainer._craft_next_contrastive_batch = next_batch
    trainer._craft_auxiliary_contrastive = spy
    start = probe.detach().clone()
    trainer.train()
    assert trainer.state.global_step == 3
    assert len(deltas) == 3  # 3 steps of one micro-batch, each with a contrastive micro-batch
    assert all(float(d.abs().sum()) > 0 for d in deltas)
    assert torch.allclose(deltas[0], references[0], atol=1e-6, rtol=1e-4)
    assert not torch.equal(start, probe.detach())
    logs = [entry for entry in trainer.state.log_history if "loss/craft_contrast" in entry]
    assert logs and all(entry["balancing/craft_weight_contrastive"] == pytest.approx(0.5) for entry in logs)


def test_wrapper_beta_schedules_the_contrastive_micro_batches(tmp_path):
    trainer = _trainer("DPO", tmp_path, beta=0.5, gradient_accumulation_steps=2)
    calls = []
    original = trainer._craft_auxiliary_contrastive
    trainer._craft_auxiliary_contrastive = lambda m: (calls.append(trainer._craft_micro_batch_index - 1),
                                                      original(m))[1]
    trainer.train()
    assert calls == [1, 3, 5]  # floor((k+1)/2) > floor(k/2) for k = 1, 3, 5 of 6 micro-batches


@pytest.mark.parametrize("kind", ["DPO", "KTO", "ORPO", "GRPO", "RLOO"])
def test_wrapper_logged_loss_is_the_optimised_objective(kind, tmp_path):
    """GA 2, beta 0.5: every step is one host and one contrastive micro-batch (k = 1, 3, 5 contrastive); the
    Trainer's ``loss`` (the sum of what the step backpropagated) equals alpha · L_host + (1 - alpha) · L_con."""
    trainer = _trainer(kind, tmp_path, alpha=0.7, beta=0.5, gradient_accumulation_steps=2)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry and "loss/craft_total" in entry]
    assert len(logs) == 3
    for entry in logs:
        host, contrast = entry["loss/craft_sft"], entry["loss/craft_contrast"]
        assert contrast > 0.1  # the InfoNCE part is far from negligible: leaving it out would show
        assert entry["loss/craft_total"] == pytest.approx(0.7 * host + 0.3 * contrast, rel=1e-6)
        assert entry["loss"] == pytest.approx(entry["loss/craft_total"], rel=1e-5, abs=1e-6)
        # Throughput of the host's tokenised batches and the contrastive ones; GRPO / RLOO get raw prompts.
        assert (entry.get("craft/tokens_per_second", 0) > 0) == (kind not in ("GRPO", "RLOO"))


@pytest.mark.parametrize("key, value", [("craft_beta_mode", "auto"), ("craft_length_strategy", "cap"),
                                        ("craft_length_strategy", "auto_beta"), ("craft_length_strategy", "error")])
def test_wrapper_refuses_schedule_settings_it_cannot_honour(key, value, tmp_path):
    from craft.errors import UserError

    with pytest.raises(UserError, match=rf"CRAFTDPOTrainer: {key}='{value}' is not supported.*{key}="):
        _trainer("DPO", tmp_path, beta=0.5, **{key: value})
    assert _trainer("DPO", tmp_path, beta=0.5, craft_beta_mode="fixed", craft_length_strategy="oversample")


def test_ppo_names_the_trl_version_and_alternatives():
    import trl

    if hasattr(trl, "PPOTrainer"):
        pytest.skip("this TRL ships PPOTrainer")
    with pytest.raises(ImportError, match=rf"TRL {trl.__version__} .*CRAFTGRPOTrainer or CRAFTRLOOTrainer"):
        from craft.trainers import CRAFTPPOTrainer  # noqa: F401
    from transformers import TrainingArguments

    from craft.config import CRAFTPPOConfig  # the config still builds (presets, saved configs), on TrainingArguments

    assert issubclass(CRAFTPPOConfig, TrainingArguments)
    assert CRAFTPPOConfig(output_dir="o", use_cpu=True, craft_alpha=0.8).craft_alpha == 0.8


def test_self_align_wrapper_needs_a_contrastive_dataset(tmp_path):
    from craft.errors import UserError
    from craft.trainers import CRAFTDPOTrainer

    data = Dataset.from_list([{"prompt": t, "chosen": " a", "rejected": " b", "labels": [1, 2]} for t in TEXTS])
    bundle = make_craft_datasets(data, strategy="self_align")
    args = config.CRAFTDPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], bf16=False)
    with pytest.raises(UserError, match="needs a separate contrastive_dataset"):
        CRAFTDPOTrainer(model=tiny_model("llama"), ref_model=tiny_model("llama"), args=args, train_dataset=data,
                        processing_class=make_tokenizer(), craft_bundle=bundle)


def test_wrapper_trains_from_a_preset_with_auto_beta(tmp_path):
    """`CRAFTDPOConfig.from_preset("balanced")` (auto beta in the preset) builds a DPO trainer that trains."""
    from craft.config import CRAFTDPOConfig
    from craft.trainers import CRAFTDPOTrainer

    args = CRAFTDPOConfig.from_preset("balanced", output_dir=str(tmp_path), per_device_train_batch_size=2,
                                      max_steps=2, use_cpu=True, report_to=[], bf16=False, save_strategy="no",
                                      disable_tqdm=True, craft_projection_dim=16, craft_beta=0.5, logging_steps=1)
    host_data = _host_dataset("DPO")
    trainer = CRAFTDPOTrainer(model=tiny_model("llama"), ref_model=tiny_model("llama"), args=args,
                              train_dataset=host_data, processing_class=make_tokenizer(),
                              craft_bundle=make_craft_datasets(host_data, contrastive_dataset=_pairs(),
                                                               strategy="paired_dataset"))
    trainer.train()
    assert [h["loss/craft_contrast"] > 0 for h in trainer.state.log_history if "loss/craft_contrast" in h] == [True]
