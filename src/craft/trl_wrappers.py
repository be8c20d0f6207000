"""CRAFT for the TRL trainers whose objective is not a token-level SFT loss: DPO, KTO, ORPO, GRPO, RLOO (and PPO
when the installed TRL has it).

These hosts keep their own data pipeline (preference pairs, prompts with generation and rewards) and their own
loss, including its normalisation across the accumulation window. CRAFT adds the contrastive term beside it.
Per optimizer step the parameters follow the gradient of

    J = craft_alpha * L_host + (1 - craft_alpha) * L_con

* ``L_host`` is the host's own step objective: the loss its ``compute_loss`` returns, scaled by ``craft_alpha``
  (times the balancing weight), then normalised exactly as the host and Trainer normalise it.
* ``L_con`` is the mean InfoNCE over the step's contrastive micro-batches. Host micro-batch ``k`` (counted over
  the run) is accompanied by one contrastive micro-batch iff ``floor((k+1)·γ) > floor(k·γ)`` (γ =
  1 - ``craft_beta``, as `craft.data.CRAFTMixedDataLoader` schedules them); its InfoNCE is weighted
  ``(1 - alpha) / M`` (M = the step's contrastive micro-batches) and backpropagated right away, under DDP's
  ``no_sync`` (the host's last backward of the step all-reduces the sum).

The contrastive batches come from ``craft_bundle``: a paired dataset, or (self-align) a dataset with an
assistant span given as ``contrastive_dataset``. They are drawn from a seeded loader sharded per rank and
restarted (new shuffle) when exhausted: the stream runs beside the host's own loader at the fixed rate
``craft_beta``, which is what ``craft_length_strategy="oversample"`` means. ``craft_beta_mode="auto"`` and the
other length strategies need the mixed loader of `craft.trainers.CRAFTSFTTrainer`; they are a `UserError` naming
the key at construction. GradCache, the negative queue and gradient balancing work as in
`craft.trainers.CRAFTTrainerMixin`.

Logged: "loss/craft_sft" is ``L_host`` (the sum over the step's micro-batches of what the host's step objective
gets from each: its loss divided by the accumulation steps when Trainer divides, as is), "loss/craft_contrast"
``L_con``, "loss/craft_total" ``J``; the Trainer's ``loss`` is what was backpropagated in all (the host's
weighted loss plus the weighted InfoNCE), so it equals "loss/craft_total" without gradient balancing.
"""

from __future__ import annotations

import torch

from craft.accumulator import AccumulationScaler, WindowCounts
from craft.config import TRLFeatureUnavailable, trl_version
from craft.data import (ContrastiveStream, CRAFTCollator, build_loader, canonical_columns, contrastive_count,
                        is_contrastive_step)
from craft.errors import UserError
from craft.balancing_step import CONTRASTIVE_TASK, SFT_TASK
from craft.preference_rows import PreTokenisedPreferenceRows
from craft.trainer_logging import WindowLog
from craft.trainer_keys import RenamedRows
from craft.trainer_loaders import CRAFTLoadersMixin
from craft.trainers import CRAFTTrainerMixin


class CRAFTAuxiliaryContrastiveMixin(CRAFTTrainerMixin):
    """`CRAFTTrainerMixin` for hosts with their own objective (module docstring): ``class T(this, trl.DPOTrainer)``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The host's own normalisation of its loss stays in force (the CRAFT mixin pre-normalises SFT losses).
        self.__dict__.pop("loss_is_scaled_for_ga", None)
        bundle = self.craft_bundle
        if self.craft_self_align and bundle.contrastive_dataset is bundle.sft_dataset:
            raise UserError(f"{type(self).__name__} with strategy 'self_align' needs a separate contrastive_dataset "
                            "with an assistant span (labels or assistant_mask): the host's own batches "
                            "(preference pairs, prompts) have none")
        check_wrapper_schedule(type(self).__name__, self.args)
        self._craft_micro_batch_index = 0
        self._craft_contrastive_stream: ContrastiveStream | None = None

    # ------------------------------------------------------------------------------------------ data

    def get_train_dataloader(self):
        # The host's own loader (preference pairs, prompts), not the CRAFT mixed loader: contrastive micro-batches
        # are drawn beside it (`_craft_next_contrastive_batch`).
        return super(CRAFTLoadersMixin, self).get_train_dataloader()

    def _craft_contrastive_batches(self) -> ContrastiveStream:
        """The contrastive stream (`craft.data.ContrastiveStream`: pass p shuffled as (seed, p), its position
        saved in checkpoints), over ``craft_contrastive_loader`` or a seeded loader of the bundle's pairs."""
        if self._craft_contrastive_stream is None:
            loader = self._craft_contrastive_loader
            if loader is None:
                tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
                pad_id = getattr(tokenizer, "pad_token_id", None)
                collator = CRAFTCollator(pad_token_id=0 if pad_id is None else pad_id,
                                         assistant_mask_key=self.args.craft_assistant_mask_key)
                if self._craft_custom_keys:
                    collator = RenamedRows(collator, self._craft_custom_keys)
                args = self.args
                seed = args.data_seed if args.data_seed is not None else args.seed
                loader = build_loader(self.craft_bundle.contrastive_dataset,
                                      args.craft_contrastive_batch_size or args.per_device_train_batch_size, collator,
                                      shuffle=True, seed=seed, num_replicas=args.world_size, rank=args.process_index)
                self._craft_contrastive_loader = loader
            self._craft_contrastive_stream = ContrastiveStream(loader)
            # batches drawn so far: one per contrastive micro-batch among host micro-batches 0..index-1
            self._craft_contrastive_stream.seek(contrastive_count(self._craft_micro_batch_index, self.args.craft_beta))
        return self._craft_contrastive_stream

    def _craft_next_contrastive_batch(self) -> dict:
        batch = canonical_columns(next(self._craft_contrastive_batches()), self._craft_custom_keys)
        device = self.args.device
        return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}

    # ------------------------------------------------------------------------------- accumulation window

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, num_items = super(CRAFTTrainerMixin, self).get_batch_samples(epoch_iterator, num_batches, device)
        self._craft_open_window(len(batches))
        return batches, num_items

    def _craft_open_window(self, num_micro_batches: int) -> None:
        start, beta = self._craft_micro_batch_index, self.args.craft_beta
        terms = sum(is_contrastive_step(start + i, beta) for i in range(num_micro_batches))
        world = self.accelerator.num_processes
        # Every rank follows the same schedule: the window holds terms * world InfoNCE terms in all.
        scaler = AccumulationScaler(self.args.craft_alpha, WindowCounts(num_micro_batches, terms * world), world)
        self._craft_scaler = self._craft_balanced_scaler(scaler)
        # L_host is a sum of the micro-batches' shares (`compute_loss`): its normaliser is 1.
        self._craft_window = WindowLog(WindowCounts(1, terms), num_micro_batches)
        if self.args.craft_debug:
            self._craft_debug_window(f"{num_micro_batches} host micro-batches, {terms} contrastive on this rank")

    # ------------------------------------------------------------------------------------------- losses

    def _craft_trainer_divides_by_ga(self, num_items_in_batch) -> bool:
        """Whether `Trainer.training_step` divides this host's loss by the accumulation steps."""
        if self.loss_is_scaled_for_ga is not None:
            return not self.loss_is_scaled_for_ga
        scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
        return not scaled

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Training: ``alpha · λ · host loss`` (uncertainty: ``alpha · (exp(-s) · host loss + s / steps)``)."""
        host = super(CRAFTTrainerMixin, self).compute_loss
        if not model.training:
            return host(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if self._craft_window is None or self._craft_window.remaining <= 0:
            self._craft_open_window(1)  # called outside the Trainer loop: its own window
        result = host(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        loss, outputs = (result[0], result[1:]) if return_outputs else (result, None)
        # The Trainer (or the host) averages the window's micro-batches: s's share per micro-batch follows suit.
        steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        divides = self._craft_trainer_divides_by_ga(num_items_in_batch)
        units = 1.0 if divides else 1.0 / steps
        weighted = self.craft_balancing.task_term(SFT_TASK, self.args.craft_alpha, loss, units)
        # This micro-batch's share of the step's L_host (what Trainer backpropagates, over alpha · λ).
        self._craft_window.sft_nll_sum += float(loss.detach()) / (steps if divides else 1)
        self._craft_end_micro_batch()
        return (weighted, *outputs) if return_outputs else weighted

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The host's micro-batch, preceded by a contrastive one when the schedule says so. Returns what was
        backpropagated in all (the host's weighted loss plus the weighted InfoNCE): Trainer logs its sum as
        ``loss``, so ``loss`` is the optimised objective."""
        if self._craft_window is None or self._craft_window.remaining <= 0:
            self._craft_open_window(1)
        index = self._craft_micro_batch_index
        self._craft_micro_batch_index += 1
        contrastive = None
        if is_contrastive_step(index, self.args.craft_beta):
            contrastive = self._craft_auxiliary_contrastive(model)
        host = super().training_step(model, inputs, num_items_in_batch)
        return host if contrastive is None else host + contrastive.to(host.device)

    def _craft_auxiliary_contrastive(self, model) -> torch.Tensor:
        """Forward and backward of one weighted contrastive micro-batch, before the host's own step; returns the
        weighted loss it backpropagated (detached)."""
        batch = self._craft_next_contrastive_batch()
        self._craft_count_tokens(batch)
        self.craft_objective.train()
        with self.accelerator.no_sync(model):
            loss = self._craft_contrastive_micro_batch_loss(model, batch)
            self.accelerator.backward(loss)
        if self.craft_balancing.per_task_gradients:
            self.craft_balancing.collect(self._craft_trainable_parameters(), CONTRASTIVE_TASK)
        return loss.detach()


    # ------------------------------------------------------------------------------------------- state

    def craft_state_dict(self, tensors=None) -> dict:
        """The objective's state plus the schedule position: host micro-batches trained so far (the contrastive
        stream's position follows from it and craft_beta)."""
        return {**super().craft_state_dict(tensors), "schedule": {"micro_batches": self._craft_micro_batch_index}}

    def load_craft_state_dict(self, state: dict) -> None:
        state = dict(state)
        schedule = state.pop("schedule", None)
        super().load_craft_state_dict(state)
        if schedule is not None:
            self._craft_micro_batch_index = int(schedule["micro_batches"])
            self._craft_contrastive_stream = None  # re-seeks on the next contrastive micro-batch

def check_wrapper_schedule(owner: str, args) -> None:
    """The wrappers schedule contrastive micro-batches at the fixed rate ``craft_beta`` beside the host's loader
    (an endless stream: ``craft_length_strategy="oversample"``); a `UserError` naming the key for any other
    schedule setting, instead of ignoring it."""
    fix = ("set craft_beta to the SFT (host) share of micro-batches you want, or use CRAFTSFTTrainer (the presets "
           "give this trainer's config the fixed schedule by themselves)")
    if args.craft_beta_mode != "fixed":
        raise UserError(f"{owner}: craft_beta_mode={args.craft_beta_mode!r} is not supported: the host trainer keeps "
                        "its own data loader, so there are no loader lengths to derive beta from; use "
                        f"craft_beta_mode='fixed' and {fix}")
    if args.craft_length_strategy != "oversample":
        raise UserError(f"{owner}: craft_length_strategy={args.craft_length_strategy!r} is not supported: the "
                        "contrastive batches are an endless stream beside the host's own loader (restarted when "
                        "exhausted, as 'oversample' does) and cannot cut the host's epoch; use "
                        f"craft_length_strategy='oversample' and {fix}")


def _wrapper(host_name: str, host_class, config_name: str):
    doc = (f"`{host_name}` with CRAFT (`craft.trl_wrappers`): the host's arguments plus ``craft_bundle`` "
           f"(and optionally ``craft_contrastive_loader``); ``args`` is a `craft.config.{config_name}`.")
    bases = (CRAFTAuxiliaryContrastiveMixin, host_class)
    if host_name == "ORPOTrainer":  # TRL's ORPO tokenises text rows only; pre-tokenised ones are completed
        doc += " Pre-tokenised preference rows are accepted (`craft.preference_rows`)."
        bases = (CRAFTAuxiliaryContrastiveMixin, PreTokenisedPreferenceRows, host_class)
    if host_name in ("GRPOTrainer", "RLOOTrainer"):  # TRL's RepeatSampler is not resume-exact past epoch 1
        from craft.host_sampler import RepeatSamplerEpochs

        doc += " Prompts are drawn by `craft.host_sampler.EpochRepeatSampler`: TRL's order, resumed exactly."
        bases = (CRAFTAuxiliaryContrastiveMixin, RepeatSamplerEpochs, host_class)
    return type(f"CRAFT{host_class.__name__}", bases, {"__doc__": doc})


def _trl_class(name: str):
    import trl

    if name == "ORPOTrainer":
        from trl.experimental.orpo import ORPOTrainer

        return ORPOTrainer
    host = getattr(trl, name, None)
    if host is None and name == "PPOTrainer":
        raise TRLFeatureUnavailable(
            f"CRAFTPPOTrainer needs trl.PPOTrainer, which TRL {trl_version()} does not have (TRL 1.x removed PPO); "
            "use CRAFTGRPOTrainer or CRAFTRLOOTrainer for online RL, or install a TRL that ships PPOTrainer")
    return host


_WRAPPERS = {
    "CRAFTDPOTrainer": ("DPOTrainer", "CRAFTDPOConfig"),
    "CRAFTGRPOTrainer": ("GRPOTrainer", "CRAFTGRPOConfig"),
    "CRAFTKTOTrainer": ("KTOTrainer", "CRAFTKTOConfig"),
    "CRAFTRLOOTrainer": ("RLOOTrainer", "CRAFTRLOOConfig"),
    "CRAFTORPOTrainer": ("ORPOTrainer", "CRAFTORPOConfig"),
    "CRAFTPPOTrainer": ("PPOTrainer", "CRAFTPPOConfig"),
}
_built: dict[str, type] = {}


def __getattr__(name: str):
    """The wrapper classes are built on first access, so a missing TRL trainer fails only the name asked for."""
    if name not in _WRAPPERS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _built:
        host_name, config_name = _WRAPPERS[name]
        _built[name] = _wrapper(host_name, _trl_class(host_name), config_name)
        _built[name].__module__ = __name__
    return _built[name]
