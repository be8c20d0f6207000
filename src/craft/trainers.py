"""CRAFT trainers: InfoNCE layered on `transformers.Trainer` and `trl.SFTTrainer`, with exact alpha weighting.

`CRAFTTrainerMixin` goes first in the bases of any Trainer subclass (`class T(CRAFTTrainerMixin, Trainer)`);
`CRAFTSFTTrainer` is the mixin on `trl.SFTTrainer`. Per optimizer step the parameters follow the gradient of

    J = craft_alpha * L_sft + (1 - craft_alpha) * L_con

(`craft.accumulator` has the definition and the per-micro-batch weights). The train loader is a
`craft.loader.CRAFTMixedDataLoader` (built by `craft.trainer_loaders`); each micro-batch is tagged "sft" or "craft" (contrastive; "contrastive" is
accepted too):

* SFT micro-batch: the host trainer's own causal-LM loss, as a token sum, weighted by alpha * W / N_sft.
  With `strategy="self_align"` the same forward also gives the InfoNCE term: the last hidden state [B, T, H] is
  pooled twice, over the prompt span (attention mask and not assistant) for the anchor and over the assistant
  span (`labels != -100` or the assistant-mask column) for the positive.
* Contrastive micro-batch (paired strategy): anchors (`input_ids`, `attention_mask`) and positives
  (`input_ids_tgt`, `attention_mask_tgt`) run through the (accelerate-wrapped) model in one forward, are pooled,
  projected by the trainer's `ProjectionHead` (hidden_size -> craft_projection_dim) and scored by InfoNCE
  (`craft.trainer_contrastive`).

The contrastive objective — pooling, projection head, temperature, InfoNCE, negative queue, balancing state — is
one module, `trainer.craft_objective` (`craft.objective.ContrastiveObjective`), attached to the model as its
submodule ``craft_objective``: the optimizer, DDP / DeepSpeed / FSDP and their checkpoints treat its parameters
like the model's. `save_model` writes the plain HF model and `craft_state.pt` beside it (also in every
checkpoint); `train(resume_from_checkpoint=...)` restores it. The trainer only routes batches:
batch -> trainer -> model (+ `craft.encoding`) + objective -> loss.

At scale (see docs/craft_scale.md): `craft_use_gradcache` sends contrastive micro-batches through
`craft.gradcache.contrastive_gradcache`; `craft_negative_strategy="queue"` adds the objective's MoCo queue as
extra negatives; with several ranks the other ranks' positives are negatives too (`craft_gather_negatives`);
`craft_gradient_balancing` multiplies each task's weight by a balancing weight (`trainer.craft_balancing`, logged
as `balancing/craft_weight_sft|contrastive` = alpha-weight x balancing weight). The preference / RL wrappers
(`CRAFTDPOTrainer`, `CRAFTGRPOTrainer`, `CRAFTKTOTrainer`, `CRAFTRLOOTrainer`, `CRAFTORPOTrainer`,
`CRAFTPPOTrainer`) live in `craft.trl_wrappers` and are importable from here.
"""

from __future__ import annotations

import inspect
import itertools
import os
from collections import defaultdict

import torch
from torch import nn

from craft.accumulator import (
    BATCH_TYPE_KEY,
    CONTRASTIVE,
    SFT,
    AccumulationScaler,
    WindowCounts,
    batch_type,
    count_window,
    sft_target_count,
    tag_kind,
)
from craft.config import CRAFTConfigMixin
from craft.collator import CRAFTCollator
from craft.encoding import hidden_state_capture, with_default_labels
from craft.engines import (check_engine_support, enable_cpu_fsdp2, engine_name, full_state_dict, host_saves_no_model,
                           is_sharded, prepare_objective)
from craft.errors import UserError
from craft.balancing_step import CONTRASTIVE_TASK, SFT_TASK, BalancedScaler
from craft.hooks import text_config, unwrap_model
from craft.objective import OBJECTIVE_NAME, ContrastiveObjective, attach_objective
from craft.loader import CRAFTMixedDataLoader
from craft.trainer_contrastive import CRAFTContrastiveMixin
from craft.trainer_keys import CRAFTBatchKeysMixin
from craft.trainer_loaders import CRAFTLoadersMixin, EpochSync
from craft.trainer_logging import CRAFTLoggingMixin, WindowLog
from craft.validation import (check_bundle_matches, check_craft_keywords, check_prepared_dataset, check_train_dataset,
                              warn_no_op_settings)

CRAFT_STATE_NAME = "craft_state.pt"
# Keys a model forward accepts besides those in its signature.
_LABEL_KEYS = ("labels", "shift_labels")
# Packed-batch keys (TRL's padding-free collator, `craft.packing`) that reach attention through `**kwargs`.
_PACKED_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


class CRAFTTrainerMixin(CRAFTLoggingMixin, CRAFTBatchKeysMixin, CRAFTLoadersMixin, CRAFTContrastiveMixin):
    """CRAFT for a `transformers.Trainer` subclass: `class MyTrainer(CRAFTTrainerMixin, Trainer)`.

    Extra keyword arguments:
        craft_bundle: the `craft.data.CRAFTDatasetBundle` of `make_craft_datasets` (strategy and datasets);
            without one, ``contrastive_dataset`` and ``craft_strategy`` build it from ``train_dataset``
            (paired with a contrastive dataset, else self-align), as contrastive-ft 0.4.3 did.
        craft_sft_loader / craft_contrastive_loader: DataLoaders used instead of the ones built from the datasets
            (batch size per_device_train_batch_size / craft_contrastive_batch_size, the trainer's data collator or
            `CRAFTCollator`, seeded shuffling, sharded per rank); or ``craft_loader_factory(trainer) ->
            (sft_loader, contrastive_loader or None)``. ``craft_collator`` collates the built contrastive loader.
    `args` must be a CRAFT config (`CRAFTTrainingArguments`, `CRAFTSFTConfig`, ...).

    Subclasses change the contrastive computation by overriding `_contrastive_loss(model, batch)` (a whole
    contrastive micro-batch); negatives and the loss itself live in `trainer.craft_objective`.
    """

    # Whether the host's compute_loss divides the summed token NLL by `num_items_in_batch` (TRL's does always;
    # transformers' Trainer does when the model accepts loss kwargs). None: decide from the Trainer's attributes.
    craft_host_normalises_by_num_items: bool | None = None

    def __init__(self, *args, craft_bundle=None, craft_sft_loader=None, craft_contrastive_loader=None,
                 contrastive_dataset=None, craft_strategy=None, craft_collator=None, craft_loader_factory=None,
                 **kwargs):
        check_craft_keywords(type(self).__name__, kwargs, ("craft_bundle", "craft_sft_loader",
                                                           "craft_contrastive_loader", "craft_strategy",
                                                           "craft_collator", "craft_loader_factory"))
        bound = inspect.signature(super().__init__).bind_partial(*args, **kwargs).arguments
        self._craft_user_collator = bound.get("data_collator")
        training_args = bound.get("args")
        if not isinstance(training_args, CRAFTConfigMixin):
            raise UserError(f"{type(self).__name__} needs args built from a CRAFT config (CRAFTSFTConfig, "
                            f"CRAFTTrainingArguments, ...); got {type(training_args).__name__}")
        if craft_loader_factory is not None and (craft_sft_loader is not None or craft_contrastive_loader is not None):
            raise UserError("pass either craft_loader_factory or craft_sft_loader / craft_contrastive_loader, not both")
        if training_args.ddp_find_unused_parameters:
            raise UserError("ddp_find_unused_parameters=True does not work with CRAFT: the contrastive objective's "
                            "parameters are used outside the model's forward, which DDP's unused-parameter search "
                            "would mark ready twice; leave it unset (CRAFT gives every parameter a gradient)")
        # transformers would turn the search on for models without gradient checkpointing.
        training_args.ddp_find_unused_parameters = False
        check_train_dataset(bound.get("train_dataset"))
        super().__init__(*args, **kwargs)
        check_prepared_dataset(self.train_dataset)
        self.craft_bundle = self._craft_resolve_bundle(craft_bundle, contrastive_dataset, craft_strategy)
        check_bundle_matches(bound.get("train_dataset"), self.craft_bundle.sft_dataset)
        self.craft_strategy = self.craft_bundle.strategy
        check_engine_support(self)
        self._craft_sft_loader = craft_sft_loader
        self._craft_contrastive_loader = craft_contrastive_loader
        self._craft_contrastive_collator = craft_collator
        self._craft_loader_factory = craft_loader_factory
        self.craft_mixed_loader: CRAFTMixedDataLoader | None = None
        # compute_loss returns window-normalised losses: Trainer must not divide them by the accumulation steps.
        self.loss_is_scaled_for_ga = True
        base = unwrap_model(self.model)
        objective = ContrastiveObjective.from_config(text_config(base).hidden_size, self.args)
        prepare_objective(engine_name(self), objective)
        attach_objective(base, objective.to(self.args.device))
        self._craft_check_compat_keys()
        self._craft_step_losses: dict[int, float] = {}
        parameters = inspect.signature(base.forward).parameters
        self._craft_forward_names = set(parameters) | set(_LABEL_KEYS)
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            self._craft_forward_names |= set(_PACKED_KEYS)
        self._craft_window: WindowLog | None = None
        self._craft_scaler: AccumulationScaler | None = None
        self.add_callback(EpochSync(self))
        self._craft_logs: dict[str, list[float]] = defaultdict(list)
        self._craft_warn_no_ops(base)

    def create_accelerator_and_postprocess(self):
        """The host's Accelerator; on CPU with FSDP2 requested, accelerate's FSDP path switched on
        (`craft.engines.enable_cpu_fsdp2`)."""
        super().create_accelerator_and_postprocess()
        enable_cpu_fsdp2(self)

    def _craft_warn_no_ops(self, base) -> None:
        """`craft.validation.warn_no_op_settings` for this trainer's model, schedule and batch sizes."""
        args = self.args
        bundle = self.craft_bundle
        scheduled = (self.craft_self_align or args.craft_beta < 1 or args.craft_beta_mode == "auto"
                     or args.craft_length_strategy == "auto_beta")
        sft_pairs = self.craft_self_align and bundle.contrastive_dataset is bundle.sft_dataset
        size = args.per_device_train_batch_size if sft_pairs else (args.craft_contrastive_batch_size
                                                                   or args.per_device_train_batch_size)
        size = getattr(self._craft_contrastive_loader, "batch_size", None) or size
        causal = type(base).__name__.endswith("ForCausalLM") or bool(getattr(base.config, "is_decoder", False))
        warn_no_op_settings(args, model_is_causal=causal, contrastive_scheduled=scheduled,
                            contrastive_batch_size=size,
                            negatives_from_other_ranks=args.world_size > 1 and args.craft_gather_negatives is not False)

    @property
    def craft_objective(self) -> ContrastiveObjective:
        """The contrastive objective module attached to the model (`craft.objective`)."""
        return getattr(unwrap_model(self.model), OBJECTIVE_NAME)

    @property
    def craft_modules(self) -> ContrastiveObjective:
        """The objective's trainable parts (`.projection`, `.infonce`, `.balancing`): the objective itself."""
        return self.craft_objective

    @property
    def craft_queue(self):
        return self.craft_objective.queue

    @property
    def craft_balancing(self):
        return self.craft_objective.balancer

    # ---------------------------------------------------------------------------------------------- data

    @property
    def craft_self_align(self) -> bool:
        return self.craft_strategy == "self_align"

    # ------------------------------------------------------------------------------- accumulation window

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Fetch one accumulation window and set the exact-alpha weights for its micro-batches.

        Returns (batches, N_sft) with N_sft the window's SFT target tokens over all ranks; contrastive
        micro-batches never count as SFT tokens.
        """
        batches = [with_default_labels(self._craft_canonical(batch), batch_type(batch))
                   for batch in itertools.islice(epoch_iterator, num_batches)]
        shifted = getattr(self, "_loss_shifts_labels", True)
        local = count_window(batches, self.craft_self_align, labels_are_shifted_by_model=shifted)
        world = self.accelerator.num_processes
        total = local
        if world > 1:
            summed = self.accelerator.gather(
                torch.tensor([local.sft_tokens, local.contrastive_terms], device=device)).view(world, 2).sum(0)
            total = WindowCounts(int(summed[0]), int(summed[1]))
        self._craft_scaler = self._craft_balanced_scaler(AccumulationScaler(self.args.craft_alpha, total, world))
        self._craft_window = WindowLog(local, len(batches))
        if self.args.craft_debug:
            shapes = ", ".join(f"{batch_type(b)} {tuple(b['input_ids'].shape)}" for b in batches)
            self._craft_debug_window(f"micro-batches [{shapes}]")
        return batches, torch.tensor(total.sft_tokens, device=device)

    def _craft_balanced_scaler(self, scaler: AccumulationScaler) -> BalancedScaler:
        """`scaler` with this step's balancing weights (`craft.balancing_step.BalancedScaler`)."""
        return BalancedScaler(scaler, self.craft_balancing, split_backward=self._craft_backward_contrastive_part)

    def _craft_backward_contrastive_part(self, loss: torch.Tensor) -> None:
        """gradnorm / pcgrad with self-align: the contrastive part of a micro-batch gets its own backward (the graph
        is kept for the SFT part) and its gradient goes to the contrastive buffer."""
        self.accelerator.backward(loss, retain_graph=True)
        self.craft_balancing.collect(self._craft_trainable_parameters(), CONTRASTIVE_TASK)

    def _craft_model_inputs(self, inputs) -> dict:
        """The entries of a batch the model forward takes (drops the batch tag, assistant mask, `*_tgt`, ...)."""
        return {k: v for k, v in inputs.items() if k in self._craft_forward_names}

    # ------------------------------------------------------------------------------------------- losses

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Training: the micro-batch's share of J (see module docstring). Evaluation: the host's plain SFT loss."""
        kind = inputs.pop(BATCH_TYPE_KEY, None)
        kind = None if kind is None else tag_kind(kind)  # contrastive-ft's "craft" and "contrastive" alike
        if not model.training:
            return super().compute_loss(model, self._craft_model_inputs(inputs), return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        if self._craft_scaler is None or self._craft_window is None or self._craft_window.remaining <= 0:
            # Called outside the Trainer loop (no window fetched): this micro-batch is its own window.
            [inputs], _ = self.get_batch_samples(iter([{**inputs, BATCH_TYPE_KEY: kind or SFT}]), 1,
                                                 self.args.device)
            kind = inputs.pop(BATCH_TYPE_KEY)
        self.craft_objective.train()
        inputs = with_default_labels(inputs, kind)
        if kind == CONTRASTIVE:
            loss = self._craft_contrastive_micro_batch_loss(model, inputs)
        else:
            loss = self._sft_micro_batch_loss(model, inputs)
        self._craft_end_micro_batch()
        return (loss, None) if return_outputs else loss

    def _sft_micro_batch_loss(self, model, inputs) -> torch.Tensor:
        """alpha-weighted SFT token sum, plus the self-align InfoNCE term from the same forward."""
        num_tokens = sft_target_count(inputs, getattr(self, "_loss_shifts_labels", True))
        if not self.craft_self_align:
            token_sum = self._sft_token_sum(model, self._craft_model_inputs(inputs), num_tokens)
            self._craft_window.sft_nll_sum += float(token_sum.detach())
            loss = self._craft_scaler.micro_batch_loss(sft_token_sum=token_sum, sft_tokens=num_tokens)
            return loss + self._craft_unused_objective_zero()
        anchor_mask, positive_mask, rows = self._craft_self_align_masks(inputs)
        with hidden_state_capture(model, self.args.craft_use_hidden_state_hook) as capture:
            token_sum = self._sft_token_sum(model, {**self._craft_model_inputs(inputs), **capture.forward_kwargs},
                                            num_tokens)
        contrastive, _, _ = self._pooled_infonce(capture.hidden, anchor_mask, positive_mask, rows)
        self._craft_window.sft_nll_sum += float(token_sum.detach())
        return self._craft_scaler.micro_batch_loss(sft_token_sum=token_sum, contrastive_loss=contrastive,
                                                   sft_tokens=num_tokens)

    def _sft_token_sum(self, model, model_inputs: dict, num_tokens: int) -> torch.Tensor:
        """S_b: the host's causal-LM loss of this micro-batch as a sum over its target tokens (not a mean).

        Hosts that normalise by `num_items_in_batch` get 1 (and their data-parallel factor is divided out);
        the others return a token mean, multiplied back by the micro-batch's token count.
        """
        normalises = self.craft_host_normalises_by_num_items
        if normalises is None:
            normalises = bool(self.model_accepts_loss_kwargs or self.compute_loss_func is not None)
        if not normalises:
            return super().compute_loss(model, model_inputs) * num_tokens
        loss = super().compute_loss(model, model_inputs, num_items_in_batch=1)
        if self.args.average_tokens_across_devices:
            loss = loss / (self.accelerator.num_processes // self.get_tp_size())
        return loss

    # ------------------------------------------------------------------------------ optimizer and state

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._craft_count_tokens(inputs)
        if self.craft_balancing.per_task_gradients:
            return self._craft_per_task_training_step(model, inputs, num_items_in_batch)
        return super().training_step(model, inputs, num_items_in_batch)

    def _craft_step_complete(self) -> bool:
        return self._craft_window is not None and self._craft_window.remaining == 0

    def _craft_per_task_training_step(self, model, inputs, num_items_in_batch):
        """gradnorm / pcgrad: each micro-batch's gradient goes to its task's buffer without DDP synchronisation;
        after the step's last micro-batch the buffers are averaged over ranks and combined into `.grad`."""
        task = CONTRASTIVE_TASK if batch_type(inputs) == CONTRASTIVE else SFT_TASK
        with self.accelerator.no_sync(model):
            loss = super().training_step(model, inputs, num_items_in_batch)
        params = self._craft_trainable_parameters()
        self.craft_balancing.collect(params, task)
        if self._craft_step_complete():
            average = self._craft_average_over_ranks if self.accelerator.num_processes > 1 else None
            self.craft_balancing.combine(params, self._craft_step_losses, self._craft_last_layer_indices(params),
                                         average)
        return loss

    def _craft_trainable_parameters(self) -> list[torch.Tensor]:
        """The model's trainable parameters, the objective's included, in a fixed order (the same on every rank)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def _craft_last_layer_indices(self, params) -> list[int]:
        """Indices in `params` of the last decoder layer's trainable parameters: GradNorm's shared layer W."""
        layers = [m for name, m in unwrap_model(self.model).named_modules()
                  if isinstance(m, nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks")]
        last = {id(p) for p in layers[-1][-1].parameters()} if layers and len(layers[-1]) else set()
        indices = [i for i, p in enumerate(params) if id(p) in last]
        if not indices and self.craft_balancing.strategy == "gradnorm":
            raise UserError("craft_gradient_balancing='gradnorm' needs trainable parameters in the last decoder "
                            "layer (its shared layer W); that layer is frozen or was not found")
        return indices

    def _craft_average_over_ranks(self, vector: torch.Tensor) -> torch.Tensor:
        torch.distributed.all_reduce(vector)
        return vector / self.accelerator.num_processes

    def get_decay_parameter_names(self, model) -> list[str]:
        """The host's choice, less the objective's vectors and scalars (biases, log-temperature, log-variances):
        weight decay applies to the projection head's matrices only."""
        names = super().get_decay_parameter_names(model)
        marker = OBJECTIVE_NAME + "."
        small = {name for name, p in model.named_parameters() if marker in name and p.dim() < 2}
        return [name for name in names if name not in small]

    def create_optimizer(self, *args, **kwargs):
        """The host's optimizer; one passed through ``optimizers=`` must hold the objective's parameters."""
        optimizer = super().create_optimizer(*args, **kwargs)
        present = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if any(p.requires_grad and id(p) not in present for p in self.craft_objective.parameters()):
            raise UserError("the optimizer passed in `optimizers=` does not hold the CRAFT projection head and "
                            "temperature; build it over all of model.parameters() after creating the trainer "
                            "(the objective is the model's submodule `craft_objective`)")
        return optimizer

    def craft_state_dict(self, tensors=None) -> dict:
        """The objective's parameters, queue, balancing and EMA state (`ContrastiveObjective.craft_state_dict`;
        ``tensors``: its tensors as an engine gathered them, if any)."""
        return self.craft_objective.craft_state_dict(tensors)

    def load_craft_state_dict(self, state: dict) -> None:
        self.craft_objective.load_craft_state_dict(state)

    def save_model(self, output_dir=None, _internal_call=False):
        """The host's `save_model` (the plain HF model, without the objective), then `craft_state.pt` beside it.

        On engines that shard parameters the objective's full tensors are gathered first, on every rank (a
        collective). Under FSDP with a sharded state dict the host writes no model at all, so the plain HF model is
        gathered here too (`DTensor.full_tensor` on every rank) and saved by the host's `_save` on rank 0.
        """
        engine = engine_name(self)
        tensors = full_state_dict(engine, self.craft_objective) if is_sharded(engine) else None
        super().save_model(output_dir, _internal_call)
        if host_saves_no_model(self):
            state = full_state_dict(engine, self.model)
            if self.args.should_save:
                self._save(output_dir, state_dict=state)
        self._craft_write_state(output_dir, tensors)

    def _craft_write_state(self, output_dir, tensors) -> None:
        """`craft_state.pt` in ``output_dir`` (rank 0); the objective's parameters from ``tensors`` where an engine
        gathered them from its shards, else from the objective itself."""
        if self.args.should_save:
            output_dir = self.args.output_dir if output_dir is None else output_dir
            os.makedirs(output_dir, exist_ok=True)
            torch.save(self.craft_state_dict(tensors), os.path.join(output_dir, CRAFT_STATE_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._craft_load_state(resume_from_checkpoint, load_modules=not is_sharded(engine_name(self)))

    def _load_optimizer_and_scheduler(self, checkpoint):
        """The host's restore, then, under DeepSpeed, the objective's queue, balancing and EMA state: the Trainer
        skips `_load_from_checkpoint` there (DeepSpeed's own checkpoint restored the parameters, the objective's
        included, as a submodule of the model)."""
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self.is_deepspeed_enabled:
            self._craft_load_state(checkpoint, load_modules=False)

    def _craft_load_state(self, checkpoint: str, load_modules: bool) -> None:
        """`craft_state.pt` of ``checkpoint`` into the objective (``load_modules=False``: the engine restored its
        parameters, sharded, and only the queue, balancing and EMA state are read)."""
        path = os.path.join(checkpoint, CRAFT_STATE_NAME)
        if not os.path.isfile(path):
            raise UserError(f"{checkpoint} has no {CRAFT_STATE_NAME} (CRAFT projection head and "
                            "temperature): it was not written by a CRAFT trainer")
        state = torch.load(path, map_location="cpu", weights_only=True)  # the objective moves what it loads
        self.load_craft_state_dict(state if load_modules else {k: v for k, v in state.items() if k != "modules"})


def _sft_trainer_class():
    from trl import SFTTrainer

    return SFTTrainer


class CRAFTSFTTrainer(CRAFTTrainerMixin, _sft_trainer_class()):
    """`trl.SFTTrainer` with CRAFT: `CRAFTSFTTrainer(model, args, train_dataset, craft_bundle, data_collator=None,
    craft_sft_loader=None, craft_contrastive_loader=None, **SFTTrainer kwargs)`.

    `train_dataset` is prepared by TRL as usual and feeds the SFT micro-batches; `args` is a `CRAFTSFTConfig`.
    """

    craft_host_normalises_by_num_items = True

    def __init__(self, model, args=None, train_dataset=None, craft_bundle=None, data_collator=None,
                 craft_sft_loader=None, craft_contrastive_loader=None, **kwargs):
        packs = bool(getattr(args, "padding_free", False) or (
            getattr(args, "packing", False) and getattr(args, "packing_strategy", None) in ("bfd", "bfd_split")))
        packing_collator = None
        if packs and isinstance(data_collator, CRAFTCollator):
            # TRL refuses a custom collator when it packs padding-free; the CRAFT loaders apply this one
            # (padding-free for SFT rows, padded for contrastive pairs).
            packing_collator, data_collator = data_collator, None
        super().__init__(model=model, args=args, train_dataset=train_dataset, data_collator=data_collator,
                         craft_bundle=craft_bundle, craft_sft_loader=craft_sft_loader,
                         craft_contrastive_loader=craft_contrastive_loader, **kwargs)
        if packing_collator is not None:
            self._craft_user_collator = packing_collator


_TRL_WRAPPERS = ("CRAFTDPOTrainer", "CRAFTGRPOTrainer", "CRAFTKTOTrainer", "CRAFTRLOOTrainer", "CRAFTORPOTrainer",
                 "CRAFTPPOTrainer")


def __getattr__(name: str):
    """The preference / RL wrappers of `craft.trl_wrappers`, built on first import of their name."""
    if name in _TRL_WRAPPERS:
        from craft import trl_wrappers

        return getattr(trl_wrappers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
