"""Exact resume for the hosts that sample prompts with TRL's `RepeatSampler` (GRPO, RLOO).

TRL's `RepeatSampler` seeds one generator at construction and draws a new permutation from it at every
``__iter__``: epoch e's prompt order is the (e+1)-th ``randperm`` of that generator. A run resumed from a
checkpoint builds a fresh sampler, so its first epoch gets the first permutation whatever epoch it resumes in,
and from epoch 2 on it trains other prompts than the uninterrupted run (plain `trl.GRPOTrainer` /
`trl.RLOOTrainer` included: measured on the tiny test setup, final weights off by up to 0.03 after a resume inside
epoch 2 or 3, identical after one inside epoch 1).

`EpochRepeatSampler` draws epoch e's permutation as TRL's does in epoch e (reseed, skip e permutations), from the
epoch it is told (`set_epoch`), so the uninterrupted order is TRL's own and a resumed run continues it.
`RepeatSamplerEpochs` is the trainer mixin that installs it and tells it the epoch at every epoch start (from the
global step, as Trainer counts epochs: accelerate's batch-skipping wrapper of a resumed epoch drops ``set_epoch``).
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback
from trl.trainer.utils import RepeatSampler


class EpochRepeatSampler(RepeatSampler):
    """TRL's `RepeatSampler` whose epoch e draws the permutation TRL's draws in epoch e (the generator reseeded,
    e permutations skipped), for the epoch it was told by `set_epoch`."""

    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle and self.seed is not None:
            self.generator = torch.Generator().manual_seed(self.seed)
            for _ in range(self.epoch):  # the permutations TRL's generator drew in epochs 0 .. epoch-1
                torch.randperm(self.num_samples, generator=self.generator)
        return super().__iter__()


class _SamplerEpochSync(TrainerCallback):
    """Sets the host sampler's epoch at every epoch start: global_step // optimizer steps per epoch."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        sampler = self.trainer._craft_host_sampler
        if sampler is not None and train_dataloader is not None:
            steps_per_epoch = max(-(-len(train_dataloader) // args.gradient_accumulation_steps), 1)
            sampler.set_epoch(state.global_step // steps_per_epoch)


class RepeatSamplerEpochs:
    """Trainer mixin (before the TRL host in the bases): the host's `RepeatSampler` becomes an
    `EpochRepeatSampler` (same arguments), told its epoch at every epoch start."""

    _craft_host_sampler: EpochRepeatSampler | None = None

    def _get_train_sampler(self, dataset=None):
        sampler = super()._get_train_sampler(dataset)
        if type(sampler) is RepeatSampler:
            sampler.__class__ = EpochRepeatSampler  # same state, epoch-exact iteration
            self._craft_host_sampler = sampler
            if not any(isinstance(c, _SamplerEpochSync) for c in self.callback_handler.callbacks):
                self.add_callback(_SamplerEpochSync(self))
        return sampler
