"""Exact resume: a run resumed from a checkpoint in epoch 1, at the end of epoch 1, or in epoch 3 logs the same
losses and ends with the same weights (model, projection head, temperature) as the uninterrupted run — for the
SFT mixin (with a MoCo queue, loss_scale balancing, dropout and an oversampled loader) and for the DPO, KTO,
ORPO, GRPO and RLOO wrappers (whose contrastive stream runs across epochs at its own pace). GRPO and RLOO need
`craft.host_sampler.EpochRepeatSampler`: TRL's own RepeatSampler restarts its permutation sequence on resume
(plain TRL is not exact past epoch 1 either; the sampler test shows why)."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from craft.data import CRAFTCollator, make_craft_datasets
from craft.testing import make_tokenizer, tiny_model, toy_chat_rows, toy_pair_rows

LOSS_KEYS = ("loss", "loss/craft_sft", "loss/craft_contrast", "loss/craft_total")


def _common(output_dir, **overrides):
    return dict(output_dir=str(output_dir), use_cpu=True, report_to=[], bf16=False, logging_steps=1, seed=0,
                disable_tqdm=True, save_strategy="no", learning_rate=1e-2,
                gradient_accumulation_steps=2, per_device_train_batch_size=2, num_train_epochs=3,
                craft_projection_dim=16, craft_temperature=0.1, craft_learnable_temperature=True,
                craft_projection_dropout=0.1, **overrides)


def _sft_trainer(output_dir):
    """4 SFT rows (2 batches) and 6 pairs (3 batches) at beta 0.5: an epoch is s c s c s c — 3 steps of GA 2, the
    SFT loader restarted within every epoch."""
    from craft.config import CRAFTSFTConfig
    from craft.trainers import CRAFTSFTTrainer

    sft = Dataset.from_list(toy_chat_rows(4, seed=1))
    bundle = make_craft_datasets(sft, contrastive_dataset=Dataset.from_list(toy_pair_rows(6, seed=2)))
    args = CRAFTSFTConfig(**_common(output_dir, craft_beta=0.5, craft_negative_strategy="queue",
                                    craft_negative_queue_size=8, craft_gradient_balancing="loss_scale"))
    return CRAFTSFTTrainer(model=tiny_model("llama", attention_dropout=0.1), args=args, train_dataset=sft,
                           craft_bundle=bundle, data_collator=CRAFTCollator(pad_token_id=3),
                           processing_class=make_tokenizer())


TEXTS = ["the cat sat", "a ship sails", "my friend reads", "the river runs", "our crew sings", "the storm ends",
         "a teacher waits", "the market opens"]


def _wrapper_trainer(kind, output_dir):
    """8 host rows (4 micro-batches, 2 steps per epoch) and 6 pairs (3 contrastive batches per pass) at beta 0.5:
    the contrastive stream's passes do not line up with the epochs."""
    import craft.config as config
    from craft import trainers

    if kind in ("DPO", "ORPO"):
        rows = [{"prompt": t, "chosen": " yes indeed", "rejected": " no way"} for t in TEXTS]
    elif kind == "KTO":
        rows = [{"prompt": t, "completion": " yes" if i % 2 else " no", "label": bool(i % 2)}
                for i, t in enumerate(TEXTS)]
    else:
        rows = [{"prompt": t} for t in TEXTS]
    host = Dataset.from_list(rows)
    settings = _common(output_dir, craft_beta=0.5)
    if kind in ("GRPO", "RLOO"):
        settings.update(num_generations=2, max_completion_length=4, beta=0.0)
    args = getattr(config, f"CRAFT{kind}Config")(**settings)
    kwargs = dict(model=tiny_model("llama"), args=args, train_dataset=host, processing_class=make_tokenizer(),
                  craft_bundle=make_craft_datasets(host, contrastive_dataset=Dataset.from_list(toy_pair_rows(6, 2))))
    if kind in ("GRPO", "RLOO"):
        kwargs["reward_funcs"] = lambda completions, **_: [float(len(c)) for c in completions]
    if kind in ("DPO", "KTO"):
        kwargs["ref_model"] = tiny_model("llama")
    return getattr(trainers, f"CRAFT{kind}Trainer")(**kwargs)


def _losses(trainer, after: int) -> dict[int, dict[str, float]]:
    return {h["step"]: {k: h[k] for k in LOSS_KEYS if k in h} for h in trainer.state.log_history
            if "loss" in h and h["step"] > after}


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()} | {
        f"craft.{name}": t.detach().clone() for name, t in trainer.craft_state_dict()["modules"].items()}


class _SaveAt(TrainerCallback):
    def __init__(self, steps):
        self.steps = set(steps)

    def on_step_end(self, args, state, control, **kwargs):
        control.should_save = state.global_step in self.steps


def assert_resume_is_exact(make, tmp_path, checkpoints: dict[str, int]):
    """Train uninterrupted (checkpoints at the given steps), then resume a fresh trainer from each of them: the
    losses logged after it and the final weights must be identical."""
    full = make(tmp_path / "full")
    full.add_callback(_SaveAt(checkpoints.values()))
    full.train()
    steps_per_epoch = full.state.max_steps // 3
    assert full.state.global_step == 3 * steps_per_epoch
    expected_weights = _weights(full)
    for where, step in checkpoints.items():
        resumed = make(tmp_path / where)
        resumed.train(resume_from_checkpoint=str(tmp_path / "full" / f"checkpoint-{step}"))
        got, want = _losses(resumed, step), _losses(full, step)
        assert got.keys() == want.keys() and got, where
        for s in want:
            assert got[s] == pytest.approx(want[s], rel=1e-6, abs=1e-9), f"{where}: step {s}"
        weights = _weights(resumed)
        for name, value in expected_weights.items():
            torch.testing.assert_close(weights[name], value, rtol=1e-6, atol=1e-7, msg=f"{where}: {name}")


def test_sft_mixin_resume_is_exact_in_epoch_1_at_the_boundary_and_in_epoch_3(tmp_path):
    # 3 steps per epoch: step 2 is inside epoch 1, step 3 ends it, step 8 is inside epoch 3
    assert_resume_is_exact(_sft_trainer, tmp_path, {"epoch1": 2, "boundary": 3, "epoch3": 8})


@pytest.mark.parametrize("kind", ["DPO", "KTO", "ORPO"])
def test_wrapper_resume_is_exact_in_epoch_1_at_the_boundary_and_in_epoch_3(kind, tmp_path):
    # 2 steps per epoch: step 1 is inside epoch 1, step 2 ends it, step 5 is inside epoch 3
    assert_resume_is_exact(lambda out: _wrapper_trainer(kind, out), tmp_path, {"epoch1": 1, "boundary": 2, "epoch3": 5})


@pytest.mark.parametrize("kind", ["GRPO", "RLOO"])
def test_online_rl_wrapper_resume_is_exact_in_epoch_1_at_the_boundary_and_in_epoch_3(kind, tmp_path):
    # 8 prompts x 2 generations in micro-batches of 2, GA 2: 4 steps per epoch; step 9 is inside epoch 3
    assert_resume_is_exact(lambda out: _wrapper_trainer(kind, out), tmp_path, {"epoch1": 1, "boundary": 4, "epoch3": 9})


def test_trl_repeat_sampler_restarts_its_order_on_resume_and_ours_does_not():
    """Why plain TRL's GRPO / RLOO are not resume-exact past epoch 1: TRL's RepeatSampler draws epoch e's order as
    the (e+1)-th permutation of one generator, so a fresh sampler (a resumed run) starts again at epoch 0's.
    EpochRepeatSampler gives TRL's order in every epoch, from the epoch it is told."""
    from trl.trainer.utils import RepeatSampler

    from craft.host_sampler import EpochRepeatSampler

    def sampler(cls):
        return cls(list(range(8)), mini_repeat_count=2, batch_size=2, repeat_count=2, seed=0)

    uninterrupted = sampler(RepeatSampler)
    trl_epochs = [list(uninterrupted) for _ in range(3)]
    assert trl_epochs[0] != trl_epochs[2] and list(sampler(RepeatSampler)) == trl_epochs[0]  # resumed: epoch 0 again
    ours = sampler(EpochRepeatSampler)
    for epoch in (2, 0, 1):  # any order, as a resumed run needs
        ours.set_epoch(epoch)
        assert list(ours) == trl_epochs[epoch]
