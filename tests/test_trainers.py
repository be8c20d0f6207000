"""CRAFT trainers: exact alpha against a closed-form reference, both objectives at GA=1, head / temperature
training and checkpoint round trip, hidden-state capture modes, self-align validation, logging, eval loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import Trainer, TrainerCallback

from craft.config import CRAFTSFTConfig, CRAFTTrainingArguments
from craft.data import CRAFTCollator, is_contrastive_step, make_craft_datasets
from craft.errors import UserError
from craft.testing import tiny_model
from craft.trainers import CRAFT_STATE_NAME, CRAFTSFTTrainer, CRAFTTrainerMixin
from craft.testing import toy_chat_rows as _chat_rows, toy_pair_rows as _pair_rows

VOCAB = 384
COLLATE = CRAFTCollator(pad_token_id=3)


class PlainCRAFTTrainer(CRAFTTrainerMixin, Trainer):
    pass


# ------------------------------------------------------------------------------------------------ toy data


def _as_dataset(rows: list[dict]) -> Dataset:
    return Dataset.from_list(rows)


def _config(cls=CRAFTSFTConfig, **overrides):
    base = dict(output_dir="unused", per_device_train_batch_size=2, use_cpu=True, report_to=[], bf16=False,
                learning_rate=1e-2, logging_steps=1, save_strategy="no", gradient_checkpointing=False,
                craft_projection_dim=16, craft_temperature=0.1, craft_beta=0.5, seed=0, disable_tqdm=True)
    return cls(**{**base, **overrides})


def _trainer(strategy="paired_dataset", host="trl", separate_contrastive=True, model=None, **config):
    sft = _as_dataset(_chat_rows(8, seed=1))
    contrastive = None
    if strategy == "paired_dataset":
        contrastive = _as_dataset(_pair_rows(8, seed=2))
    elif separate_contrastive:
        contrastive = _as_dataset(_chat_rows(8, seed=3))
    bundle = make_craft_datasets(sft, contrastive_dataset=contrastive, strategy=strategy)
    model = model if model is not None else tiny_model("llama")
    if host == "trl":
        return CRAFTSFTTrainer(model=model, args=_config(**config), train_dataset=sft, craft_bundle=bundle,
                               data_collator=COLLATE, processing_class=_tokenizer())
    return PlainCRAFTTrainer(model=model, args=_config(CRAFTTrainingArguments, **config), train_dataset=sft,
                             craft_bundle=bundle, data_collator=COLLATE)


def _tokenizer():
    from craft.testing import make_tokenizer

    return make_tokenizer()


def _window(strategy: str, beta: float, ga: int, start: int) -> list[dict]:
    """Micro-batches start..start+ga-1 of the beta schedule, collated from fixed rows (uneven lengths)."""
    sft_rows, self_align_rows, pair_rows = _chat_rows(64, 11), _chat_rows(64, 12), _pair_rows(64, 13)
    batches = []
    for k in range(start, start + ga):
        contrastive = is_contrastive_step(k, beta)
        rows = pair_rows if strategy == "paired_dataset" else self_align_rows
        rows = rows if contrastive else sft_rows
        batch = COLLATE(rows[2 * k:2 * k + 2])
        batch["craft_batch_type"] = "craft" if contrastive else "sft"
        batches.append(batch)
    return batches


# ------------------------------------------------------------------------------------- closed-form reference


def _last_token(hidden, mask):
    index = torch.where(mask.bool(), torch.arange(mask.shape[1]), -1).amax(dim=1)
    return hidden[torch.arange(hidden.shape[0]), index]


def _reference_infonce(modules, hidden_a, mask_a, hidden_p, mask_p):
    return _reference_pooled_infonce(modules, _last_token(hidden_a, mask_a), _last_token(hidden_p, mask_p))


def _reference_pooled_infonce(modules, pooled_a, pooled_p):
    anchors = F.normalize(modules.projection(pooled_a), dim=-1)
    positives = F.normalize(modules.projection(pooled_p), dim=-1)
    scale = modules.infonce.logit_scale()
    return F.cross_entropy(scale * anchors @ positives.T, torch.arange(anchors.shape[0]))


def _reference_global_gradient(trainer, batches, alpha):
    """grad J when every contrastive micro-batch of the step is one InfoNCE term over the union of their pairs
    (the anchors of each scored against the positives of all): what gathered negatives give on several ranks."""
    params = _parameters(trainer)
    sft = [b for b in batches if b["craft_batch_type"] == "sft"]
    pooled = {"": [], "_tgt": []}
    for batch in batches:
        if batch["craft_batch_type"] == "craft":
            for side in pooled:
                _, hidden = _forward(trainer.model, batch["input_ids" + side], batch["attention_mask" + side])
                pooled[side].append(_last_token(hidden, batch["attention_mask" + side]))
    g_sft = _reference_gradients(trainer, sft)[0]
    term = _reference_pooled_infonce(trainer.craft_modules, torch.cat(pooled[""]), torch.cat(pooled["_tgt"]))
    parts = torch.autograd.grad(term, params, allow_unused=True)
    g_con = torch.cat([g.flatten() if g is not None else torch.zeros(p.numel()) for g, p in zip(parts, params)])
    return alpha * g_sft + (1 - alpha) * g_con


def _forward(model, ids, mask):
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return out.logits, out.hidden_states[-1]


def _reference_terms(model, modules, batches, self_align):
    """(L_sft, L_con) of the window, each micro-batch forwarded alone: sum of token NLL / N_sft and mean InfoNCE
    (None for a term with no micro-batch)."""
    nll_sum, num_tokens, terms = 0.0, 0, []
    for batch in batches:
        logits, hidden = _forward(model, batch["input_ids"], batch["attention_mask"])
        if self_align:
            assistant = batch["labels"] != -100
            prompt = batch["attention_mask"].bool() & ~assistant
            terms.append(_reference_infonce(modules, hidden, prompt, hidden, assistant))
        elif batch["craft_batch_type"] == "craft":
            _, hidden_p = _forward(model, batch["input_ids_tgt"], batch["attention_mask_tgt"])
            terms.append(_reference_infonce(modules, hidden, batch["attention_mask"], hidden_p,
                                            batch["attention_mask_tgt"]))
        if batch["craft_batch_type"] == "sft":
            targets = batch["labels"][:, 1:]
            nll_sum = nll_sum + F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), targets.reshape(-1),
                                                ignore_index=-100, reduction="sum")
            num_tokens += int((targets != -100).sum())
    return (nll_sum / num_tokens if num_tokens else None), (torch.stack(terms).mean() if terms else None)


def _parameters(trainer):
    return [p for p in trainer.model.parameters() if p.requires_grad]  # the objective is a submodule


def _accumulated_gradient(trainer, batches):
    """The real path: Trainer.get_batch_samples -> training_step per micro-batch; gradient before the step."""
    trainer.model.zero_grad(set_to_none=True)  # as Trainer does; the CRAFT modules' are the trainer's job
    window, num_items = trainer.get_batch_samples(iter(batches), len(batches), trainer.args.device)
    trainer.current_gradient_accumulation_steps = len(window)
    for batch in window:
        trainer.training_step(trainer.model, batch, num_items)
    return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel())
                      for p in _parameters(trainer)])


def _reference_gradients(trainer, batches):
    """Closed-form gradients of L_sft and L_con (each None when absent); grad J = alpha g_sft + (1-alpha) g_con."""
    params = _parameters(trainer)
    terms = _reference_terms(trainer.model, trainer.craft_modules, batches, trainer.craft_strategy == "self_align")
    grads = []
    for term in terms:
        if term is None:
            grads.append(None)
            continue
        parts = torch.autograd.grad(term, params, allow_unused=True, retain_graph=True)
        grads.append(torch.cat([g.flatten() if g is not None else torch.zeros(p.numel())
                                for g, p in zip(parts, params)]))
    return grads


def _reference_gradient(trainer, batches, alpha):
    g_sft, g_con = _reference_gradients(trainer, batches)
    return sum(w * g for w, g in ((alpha, g_sft), (1 - alpha, g_con)) if g is not None)


def _assert_relative_close(actual, expected, tol=1e-5):
    error = float((actual - expected).norm() / expected.norm())
    assert error < tol, f"relative gradient error {error:.2e}"


@pytest.fixture(scope="module")
def exactness_trainers():
    trainers = {strategy: _trainer(strategy, craft_learnable_temperature=True, max_grad_norm=0.0)
                for strategy in ("paired_dataset", "self_align")}
    for trainer in trainers.values():
        trainer.create_optimizer()
    return trainers


ALPHAS, BETAS, GAS = (0.3, 0.6, 0.9), (0.25, 0.5, 0.75), (1, 2, 4, 8)


@pytest.mark.parametrize("strategy", ["paired_dataset", "self_align"])
@pytest.mark.parametrize("beta", BETAS)
def test_accumulated_gradient_is_exact_objective_gradient(exactness_trainers, strategy, beta):
    """For every alpha and GA: the summed micro-batch gradients equal grad[alpha L_sft + (1-alpha) L_con] for the
    model, the projection head and the temperature. GA=1 also checks the schedule's second window, whose only
    micro-batch is of the other kind (one term absent). The reference gradients of L_sft and L_con are computed
    once per window; the trainer runs the window once per alpha."""
    trainer = exactness_trainers[strategy]
    for ga in GAS:
        for start in ((0, 1) if ga == 1 else (0,)):
            batches = _window(strategy, beta, ga, start)
            g_sft, g_con = _reference_gradients(trainer, batches)
            for alpha in ALPHAS:
                trainer.args.craft_alpha = alpha
                expected = sum(w * g for w, g in ((alpha, g_sft), (1 - alpha, g_con)) if g is not None)
                _assert_relative_close(_accumulated_gradient(trainer, batches), expected)


@pytest.mark.parametrize("accepts_loss_kwargs", [True, False])
def test_plain_trainer_host_is_exact_for_both_loss_normalisations(accepts_loss_kwargs):
    """transformers.Trainer divides by num_items_in_batch only when the model takes loss kwargs; both are exact."""
    trainer = _trainer("paired_dataset", host="plain", craft_learnable_temperature=True)
    trainer.model_accepts_loss_kwargs = accepts_loss_kwargs
    trainer.args.craft_alpha = 0.3
    for beta, ga in ((0.25, 4), (0.75, 2)):
        batches = _window("paired_dataset", beta, ga, 0)
        _assert_relative_close(_accumulated_gradient(trainer, batches), _reference_gradient(trainer, batches, 0.3))


class _GradientAtStep(TrainerCallback):
    """Copies the accumulated gradient the first optimizer step is about to use."""

    def __init__(self, trainer):
        self.trainer, self.gradient = trainer, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.gradient is None:
            self.gradient = torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel())
                                       for p in _parameters(self.trainer)])


def test_full_train_loop_first_step_gradient_is_exact(tmp_path):
    """Through Trainer.train(): the gradient the optimizer sees (GA=4, beta=0.5) equals the reference on the
    micro-batches the loop fetched."""
    trainer = _trainer("paired_dataset", output_dir=str(tmp_path), gradient_accumulation_steps=4, max_steps=1,
                       max_grad_norm=0.0, craft_alpha=0.6, craft_learnable_temperature=True)
    windows = []
    fetch = trainer.get_batch_samples

    def recording_fetch(*args):
        batches, num_items = fetch(*args)
        windows.append([{k: v.clone() if torch.is_tensor(v) else v for k, v in b.items()} for b in batches])
        return batches, num_items

    trainer.get_batch_samples = recording_fetch
    callback = _GradientAtStep(trainer)
    trainer.add_callback(callback)
    start = [p.detach().clone() for p in _parameters(trainer)]
    trainer.train()
    assert [b["craft_batch_type"] for b in windows[0]] == ["sft", "craft", "sft", "craft"]
    with torch.no_grad():  # rewind to the weights the gradient was taken at
        for p, p0 in zip(_parameters(trainer), start):
            p.copy_(p0)
    trainer.model.train()
    _assert_relative_close(callback.gradient, _reference_gradient(trainer, windows[0], 0.6))


# ------------------------------------------------------------------------------------------ training behaviour


def _logged(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


def test_ga1_alternates_and_trains_both_objectives(tmp_path):
    """GA=1, beta=0.5: steps alternate SFT / contrastive; both losses are logged and the SFT loss (of the whole
    SFT dataset, before vs after) falls."""
    trainer = _trainer("paired_dataset", output_dir=str(tmp_path), gradient_accumulation_steps=1, max_steps=8,
                       craft_beta=0.5, learning_rate=3e-3)
    trainer.eval_dataset = trainer.train_dataset
    sft_before = trainer.evaluate()["eval_loss"]
    lm_head_before = trainer.model.lm_head.weight.detach().clone()
    head_before = trainer.craft_modules.projection.fc1.weight.detach().clone()
    trainer.train()
    sft = [h["loss/craft_sft"] for h in trainer.state.log_history if "loss/craft_sft" in h]
    contrast = [h["loss/craft_contrast"] for h in trainer.state.log_history if "loss/craft_contrast" in h]
    assert len(sft) == 4 and len(contrast) == 4  # one of each every two steps
    assert not torch.equal(lm_head_before, trainer.model.lm_head.weight)  # only SFT reaches lm_head's rows
    assert not torch.equal(head_before, trainer.craft_modules.projection.fc1.weight)
    assert trainer.evaluate()["eval_loss"] < sft_before


def test_logged_terms_are_the_objective(tmp_path):
    trainer = _trainer("self_align", separate_contrastive=False, output_dir=str(tmp_path),
                       gradient_accumulation_steps=2, max_steps=3, craft_alpha=0.3, craft_learnable_temperature=True)
    trainer.train()
    for entry in (h for h in trainer.state.log_history if "loss" in h):
        total = 0.3 * entry["loss/craft_sft"] + 0.7 * entry["loss/craft_contrast"]
        assert entry["loss/craft_total"] == pytest.approx(total, rel=1e-6)
        assert entry["loss"] == pytest.approx(entry["loss/craft_total"], rel=1e-5)  # what Trainer backpropagated
        assert 0.0 <= entry["metrics/craft_contrastive_accuracy"] <= 1.0
        assert -1.0 <= entry["metrics/craft_representation_consistency"] <= 1.0
        assert entry["metrics/craft_temperature"] == pytest.approx(
            float(trainer.craft_modules.infonce.temperature), rel=0.05)  # tau starts at 0.1 and moves slowly


def test_report_metrics_subset(tmp_path):
    trainer = _trainer("paired_dataset", output_dir=str(tmp_path), max_steps=2, craft_beta=0.0,
                       craft_report_metrics=["contrastive_accuracy"])
    trainer.train()
    keys = set().union(*trainer.state.log_history)
    assert "metrics/craft_contrastive_accuracy" in keys
    assert "metrics/craft_representation_consistency" not in keys and "loss/craft_sft" not in keys


class _StateAtTrainBegin(TrainerCallback):
    def __init__(self, trainer):
        self.trainer, self.state = trainer, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.state = {k: v.clone() for k, v in self.trainer.craft_modules.state_dict().items()}


def test_head_and_temperature_train_and_resume_bit_identically(tmp_path):
    """The head and log(1/tau) are in the optimizer and change; a checkpoint's craft_state.pt restores them
    bit for bit, and resuming reproduces the uninterrupted run exactly."""
    common = dict(output_dir=str(tmp_path), gradient_accumulation_steps=2, max_steps=4, save_strategy="steps",
                  save_steps=2, craft_learnable_temperature=True, learning_rate=1e-2)
    trainer = _trainer("paired_dataset", **common)
    start = {k: v.clone() for k, v in trainer.craft_modules.state_dict().items()}
    trainer.train()
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in optimized for p in trainer.craft_modules.parameters())
    final = {k: v.clone() for k, v in trainer.craft_modules.state_dict().items()}
    assert all(not torch.equal(start[k], final[k]) for k in final)  # every head tensor and the temperature moved
    saved = torch.load(tmp_path / "checkpoint-2" / CRAFT_STATE_NAME, weights_only=True)["modules"]

    continued = _trainer("paired_dataset", **common)
    at_start = _StateAtTrainBegin(continued)
    continued.add_callback(at_start)
    continued.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert all(torch.equal(at_start.state[k], saved[k]) for k in saved)  # loaded bit for bit
    assert not all(torch.equal(start[k], saved[k]) for k in saved)
    assert all(torch.equal(continued.craft_modules.state_dict()[k], final[k]) for k in final)
    model_final = dict(trainer.model.named_parameters())
    assert all(torch.equal(p, model_final[n]) for n, p in continued.model.named_parameters())


def test_resume_from_a_checkpoint_without_craft_state_is_an_error(tmp_path):
    trainer = _trainer("paired_dataset", output_dir=str(tmp_path), max_steps=1, save_strategy="steps", save_steps=1)
    trainer.train()
    (tmp_path / "checkpoint-1" / CRAFT_STATE_NAME).unlink()
    again = _trainer("paired_dataset", output_dir=str(tmp_path), max_steps=1)
    with pytest.raises(UserError, match=CRAFT_STATE_NAME):
        again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))


def test_hook_and_output_hidden_states_give_the_same_loss():
    batches = _window("self_align", 0.5, 2, 0)
    losses = []
    for hook in (True, False):
        trainer = _trainer("self_align", craft_use_hidden_state_hook=hook)
        window, num_items = trainer.get_batch_samples(iter(batches), 2, trainer.args.device)
        losses.append([float(trainer.training_step(trainer.model, b, num_items)) for b in window])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_epoch_length_counts_every_micro_batch(tmp_path):
    trainer = _trainer("paired_dataset", output_dir=str(tmp_path), craft_beta=0.75, craft_contrastive_batch_size=4)
    loader = trainer.get_train_dataloader()
    # 4 SFT batches (8 rows / 2) and 2 contrastive ones (8 rows / 4); at beta=3/4 micro-batches 3 and 7 are
    # contrastive, so oversampling until both loaders are used up takes 8 micro-batches (6 of them SFT)
    assert len(loader) == len(trainer.craft_mixed_loader) == 8
    batches = list(loader)
    assert [b["craft_batch_type"] for b in batches] == trainer.craft_mixed_loader.schedule()
    assert all(b["input_ids"].shape[0] == 4 for b in batches if b["craft_batch_type"] == "craft")


# ----------------------------------------------------------------------------------------------- validation


def test_self_align_batch_without_assistant_span_is_an_error():
    trainer = _trainer("self_align")
    batch = COLLATE(_chat_rows(2, 5))
    batch["labels"][1, :] = -100
    batch["craft_batch_type"] = "sft"
    with pytest.raises(UserError, match="row.* 1 .*no assistant token"):
        trainer.training_step(trainer.model, batch)
    batch = COLLATE(_chat_rows(2, 5))
    del batch["labels"]
    batch["craft_batch_type"] = "contrastive"
    with pytest.raises(UserError, match="'assistant_mask' or 'labels'"):
        trainer.training_step(trainer.model, batch)


def test_trainer_requires_craft_config_and_bundle():
    sft = _as_dataset(_chat_rows(4, 1))
    bundle = make_craft_datasets(sft, strategy="self_align")
    from transformers import TrainingArguments

    with pytest.raises(UserError, match="CRAFT config"):
        PlainCRAFTTrainer(model=tiny_model("llama"), args=TrainingArguments("o", use_cpu=True), train_dataset=sft,
                          craft_bundle=bundle)
    with pytest.raises(UserError, match="craft_bundle"):
        PlainCRAFTTrainer(model=tiny_model("llama"), args=_config(CRAFTTrainingArguments))
    # contrastive-ft 0.4.3's defaults: no bundle means self-align on train_dataset, or paired with a dataset
    trainer = PlainCRAFTTrainer(model=tiny_model("llama"), args=_config(CRAFTTrainingArguments), train_dataset=sft)
    assert trainer.craft_strategy == "self_align" and trainer.craft_bundle.sft_dataset is sft
    pairs = _as_dataset(_pair_rows(4, 2))
    trainer = PlainCRAFTTrainer(model=tiny_model("llama"), args=_config(CRAFTTrainingArguments), train_dataset=sft,
                                contrastive_dataset=pairs)
    assert trainer.craft_strategy == "paired_dataset" and trainer.craft_bundle.contrastive_dataset is pairs
    with pytest.raises(UserError, match="either craft_bundle or contrastive_dataset"):
        PlainCRAFTTrainer(model=tiny_model("llama"), args=_config(CRAFTTrainingArguments), train_dataset=sft,
                          craft_bundle=bundle, craft_strategy="self_align")


def test_eval_loss_is_the_plain_sft_loss(tmp_path):
    rows = _chat_rows(4, 21)
    trainer = _trainer("paired_dataset", output_dir=str(tmp_path), craft_alpha=0.3)
    trainer.eval_dataset = _as_dataset(rows)
    metrics = trainer.evaluate()
    batch = COLLATE(rows)
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-100)
    assert metrics["eval_loss"] == pytest.approx(float(expected), rel=1e-5)
    assert not math.isclose(metrics["eval_loss"], 0.3 * float(expected), rel_tol=1e-3)


def test_train_loader_set_epoch_reaches_distributed_samplers():
    from torch.utils.data import DataLoader, DistributedSampler

    rows = _as_dataset(_chat_rows(8, 1))
    sampler = DistributedSampler(rows, num_replicas=2, rank=0, seed=0)
    trainer = _trainer("self_align", separate_contrastive=False)
    trainer._craft_sft_loader = DataLoader(rows, batch_size=2, sampler=sampler, collate_fn=COLLATE)
    loader = trainer.get_train_dataloader()
    loader.set_epoch(3)
    assert sampler.epoch == 3 and len(loader) == 2  # rank 0 of 2 sees 4 rows = 2 micro-batches


_DDP_WORKER = '''
import os, sys, torch
sys.path.insert(0, {tests!r})
from transformers import TrainerCallback
from test_trainers import _trainer, _parameters

out = {out!r}
for mode, settings in {{"plain": {{}}, "gradcache": {{"craft_use_gradcache": True, "craft_gradcache_chunk_size": 1}}}}.items():
    trainer = _trainer("paired_dataset", output_dir=out, gradient_accumulation_steps=2, max_steps=2, max_grad_norm=0.0,
                       craft_alpha=0.3, craft_learnable_temperature=True, ddp_backend="gloo", **settings)
    record = {{"windows": [], "gradient": None}}
    fetch = trainer.get_batch_samples

    def recording_fetch(*args, record=record, fetch=fetch):
        batches, num_items = fetch(*args)
        if not record["windows"]:
            record["windows"] = [{{k: v.clone() if torch.is_tensor(v) else v for k, v in b.items()}} for b in batches]
        return batches, num_items

    class FirstGradient(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, record=record, trainer=trainer, **kwargs):
            if record["gradient"] is None:
                record["gradient"] = torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel())
                                                for p in _parameters(trainer)])

    trainer.get_batch_samples = recording_fetch
    trainer.add_callback(FirstGradient())
    record["craft_start"] = {{k: v.clone() for k, v in trainer.craft_modules.state_dict().items()}}
    trainer.train()
    record["final"] = torch.cat([p.detach().flatten() for p in _parameters(trainer)])
    torch.save(record, os.path.join(out, "%s_rank%s.pt" % (mode, os.environ["RANK"])))
from craft.shutdown import end_launched_process
end_launched_process(0)
'''


@pytest.mark.slow
def test_two_process_ddp_gradient_is_the_global_objective_and_ranks_agree(tmp_path):
    """2 CPU processes (gloo): the first step's gradient on each rank equals grad J over BOTH ranks' windows
    (global token count; the two ranks' contrastive micro-batches form one InfoNCE over the global batch, by the
    gathered negatives), and model + objective end identical on both ranks."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "worker.py"
    script.write_text(_DDP_WORKER.format(tests=str(Path(__file__).parent), out=str(tmp_path)))
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    from craft_scale_helpers import free_port

    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()), str(script)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for mode in ("plain", "gradcache"):  # GradCache: the gather runs over cached representations
        ranks = [torch.load(tmp_path / f"{mode}_rank{r}.pt", weights_only=False) for r in (0, 1)]
        assert torch.equal(ranks[0]["final"], ranks[1]["final"])
        assert torch.equal(ranks[0]["gradient"], ranks[1]["gradient"])

        trainer = _trainer("paired_dataset", craft_learnable_temperature=True)
        trainer.craft_modules.load_state_dict(ranks[0]["craft_start"])
        trainer.model.train()
        union = ranks[0]["windows"] + ranks[1]["windows"]
        assert [b["craft_batch_type"] for b in union] == ["sft", "craft"] * 2
        assert not torch.equal(ranks[0]["windows"][0]["input_ids"], ranks[1]["windows"][0]["input_ids"])  # sharded
        _assert_relative_close(ranks[0]["gradient"], _reference_global_gradient(trainer, union, 0.3))


def test_logs_tokens_per_second_of_every_micro_batch(tmp_path, monkeypatch):
    """craft/tokens_per_second = the interval's tokens (`batch_tokens` of each micro-batch, SFT and contrastive) /
    its wall seconds; a fake clock makes every interval last 1 s, so the logged rates sum to all tokens fed."""
    import itertools

    from craft import trainer_logging
    from craft.trainer_logging import batch_tokens

    clock = itertools.count()
    monkeypatch.setattr(trainer_logging, "perf_counter", lambda: float(next(clock)))
    trainer = _trainer("paired_dataset", output_dir=str(tmp_path), gradient_accumulation_steps=2, max_steps=3,
                       craft_beta=0.5, logging_steps=1)
    fed = []
    count = trainer._craft_count_tokens
    monkeypatch.setattr(trainer, "_craft_count_tokens", lambda batch: (fed.append(float(batch_tokens(batch))), count(batch)))
    trainer.train()
    rates = _logged(trainer, "craft/tokens_per_second")
    assert len(rates) == 3 and len(fed) == 6 and min(fed) > 0
    assert sum(rates) == pytest.approx(sum(fed))
    assert batch_tokens({"input_ids": torch.ones(2, 5), "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1] * 5]),
                         "input_ids_tgt": torch.ones(2, 3), "position_ids": torch.ones(2, 5)}) == 8 + 6
    assert batch_tokens({"prompt_ids": torch.ones(2, 4), "prompt_mask": torch.ones(2, 4),
                         "completion_ids": torch.ones(2, 3), "completion_mask": torch.tensor([[1, 0, 0], [1, 1, 0]])}) == 11
