"""CRAFT trainers: InfoNCE layered on `transformers.Trainer` and `trl.SFTTrainer`, with exact alpha weighting.

`CRAFTTrainerMixin` goes first in the bases of any Trainer subclass (`class T(CRAFTTrainerMixin, Trainer)`);
`CRAFTSFTTrainer` is the mixin on `trl.SFTTrainer`. Per optimizer step the parameters follow the gradient of

    J = craft_alpha * L_sft + (1 - craft_alpha) * L_con

(`craft.accumulator` has the definition and the per-micro-batch weights). The train loader is a
`craft.data.CRAFTMixedDataLoader`; each micro-batch is tagged "sft" or "contrastive":

* SFT micro-batch: the host trainer's own causal-LM loss, as a token sum, weighted by alpha * W / N_sft.
  With `strategy="self_align"` the same forward also gives the InfoNCE term: the last hidden state [B, T, H] is
  pooled twice, over the prompt span (attention mask and not assistant) for the anchor and over the assistant
  span (`labels != -100` or the assistant-mask column) for the positive.
* Contrastive micro-batch (paired strategy): anchors (`input_ids`, `attention_mask`) and positives
  (`input_ids_tgt`, `attention_mask_tgt`) run through the (accelerate-wrapped) model in one forward, are pooled,
  projected by the trainer's `ProjectionHead` (hidden_size -> craft_projection_dim) and scored by InfoNCE.

The projection head and the InfoNCE module (with its learnable temperature) live in `trainer.craft_modules`,
are added to the optimizer, saved as `craft_state.pt` in every checkpoint / `save_model` directory, and restored
by `train(resume_from_checkpoint=...)`.

At scale (see docs/craft_scale.md): `craft_use_gradcache` sends contrastive micro-batches through
`craft.gradcache.contrastive_gradcache_loss`; `craft_negative_strategy="queue"` adds `trainer.craft_queue`
(`craft.negatives.NegativeQueue`, saved in `craft_state.pt`) as extra negatives; `craft_gradient_balancing`
multiplies each task's weight by a balancing weight (`trainer.craft_balancing`, logged as
`balancing/craft_weight_sft|contrastive` = alpha-weight x balancing weight). The preference / RL wrappers
(`CRAFTDPOTrainer`, `CRAFTGRPOTrainer`, `CRAFTKTOTrainer`, `CRAFTRLOOTrainer`, `CRAFTORPOTrainer`,
`CRAFTPPOTrainer`) live in `craft.trl_wrappers` and are importable from here.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import os
from collections import defaultdict

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from craft.accumulator import (
    BATCH_TYPE_KEY,
    CONTRASTIVE,
    SFT,
    AccumulationScaler,
    WindowCounts,
    batch_type,
    count_window,
    sft_target_count,
)
from craft.config import CRAFTConfigMixin
from craft.data import CRAFTCollator, CRAFTMixedDataLoader, assistant_token_mask, build_loader
from craft.errors import UserError
from craft.gradcache import contrastive_gradcache_loss
from craft.gradient_balancing import CONTRASTIVE_TASK, SFT_TASK, BalancedScaler, GradientBalancing
from craft.hooks import LastHiddenStateCapture, unwrap_model
from craft.losses import InfoNCELoss, ProjectionHead
from craft.metrics import EMAReference, contrastive_accuracy
from craft.negatives import NegativeQueue

CRAFT_STATE_NAME = "craft_state.pt"
EMA_DECAY = 0.99  # representation-consistency reference: roughly the last hundred contrastive batches
# Keys a model forward accepts besides those in its signature.
_LABEL_KEYS = ("labels", "shift_labels")


class CRAFTModules(nn.Module):
    """The trainable CRAFT parameters outside the language model: `projection` (ProjectionHead H -> D) and
    `infonce` (InfoNCELoss; holds `log_inv_temperature` when the temperature is learnable)."""

    def __init__(self, hidden_size: int, args: CRAFTConfigMixin):
        super().__init__()
        self.projection = ProjectionHead(hidden_size, args.craft_projection_dim, dropout=args.craft_projection_dropout)
        self.infonce = InfoNCELoss(args.craft_temperature, args.craft_learnable_temperature, args.craft_pooling)

    def embed(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Pool hidden [B, T, H] over mask [B, T] and project: [B, D]."""
        pooled = self.infonce.pool(hidden, mask)
        return self.projection(pooled.to(self.projection.fc1.weight.dtype))


class _BackboneHiddenStates:
    """Last hidden state [B, T, H] via `output_hidden_states=True` (craft_use_hidden_state_hook=False).

    The model is asked for every layer's output (`forward_kwargs`); the last one is read from the backbone's
    output by a forward hook, because TRL's fused LM head does not return the hidden states to the caller.
    """

    forward_kwargs = {"output_hidden_states": True}

    def __init__(self, model: nn.Module):
        self.backbone = unwrap_model(model).base_model
        self.hidden = None
        self._handle = None

    def _hook(self, module, inputs, output):
        self.hidden = output.hidden_states[-1]

    def __enter__(self):
        self._handle = self.backbone.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc_info):
        self._handle.remove()


class _FinalNormHook(LastHiddenStateCapture):
    """`LastHiddenStateCapture` with the (empty) extra forward arguments the capture protocol asks for."""

    forward_kwargs: dict = {}


class _MixedBatches(IterableDataset):
    """The mixed loader as an iterable dataset, so the Trainer's `len()`, resume skipping and epochs work."""

    def __init__(self, mixed: CRAFTMixedDataLoader):
        self.mixed = mixed

    def __iter__(self):
        return iter(self.mixed)

    def __len__(self):
        return len(self.mixed)


class _MixedBatchLoader(DataLoader):
    """The Trainer's train loader: yields the mixed loader's micro-batches as they are; `set_epoch` reaches
    the per-rank samplers (a fresh shard order each epoch)."""

    def __init__(self, mixed: CRAFTMixedDataLoader):
        super().__init__(_MixedBatches(mixed), batch_size=None)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.mixed.set_epoch(epoch)


class _WindowLog:
    """Running sums of one accumulation window (this rank), turned into the logged loss terms when it ends."""

    def __init__(self, counts: WindowCounts, num_micro_batches: int):
        self.counts = counts
        self.remaining = num_micro_batches
        self.sft_nll_sum = 0.0
        self.contrastive_sum = 0.0


class CRAFTTrainerMixin:
    """CRAFT for a `transformers.Trainer` subclass: `class MyTrainer(CRAFTTrainerMixin, Trainer)`.

    Extra keyword arguments:
        craft_bundle: the `craft.data.CRAFTDatasetBundle` of `make_craft_datasets` (strategy and datasets).
        craft_sft_loader / craft_contrastive_loader: DataLoaders used instead of the ones built from the datasets
            (batch size per_device_train_batch_size / craft_contrastive_batch_size, the trainer's data collator or
            `CRAFTCollator`, seeded shuffling, sharded per rank).
    `args` must be a CRAFT config (`CRAFTTrainingArguments`, `CRAFTSFTConfig`, ...).

    Subclasses change the contrastive computation by overriding `_contrastive_loss(model, batch)` (a whole
    contrastive micro-batch, e.g. GradCache) or `_infonce(anchors, positives)` (every InfoNCE term, e.g. extra
    negatives).
    """

    # Whether the host's compute_loss divides the summed token NLL by `num_items_in_batch` (TRL's does always;
    # transformers' Trainer does when the model accepts loss kwargs). None: decide from the Trainer's attributes.
    craft_host_normalises_by_num_items: bool | None = None

    def __init__(self, *args, craft_bundle=None, craft_sft_loader=None, craft_contrastive_loader=None, **kwargs):
        bound = inspect.signature(super().__init__).bind_partial(*args, **kwargs).arguments
        self._craft_user_collator = bound.get("data_collator")
        training_args = bound.get("args")
        if not isinstance(training_args, CRAFTConfigMixin):
            raise UserError(f"{type(self).__name__} needs args built from a CRAFT config (CRAFTSFTConfig, "
                            f"CRAFTTrainingArguments, ...); got {type(training_args).__name__}")
        if craft_bundle is None:
            raise UserError(f"{type(self).__name__} needs craft_bundle=make_craft_datasets(...)")
        super().__init__(*args, **kwargs)
        self.craft_bundle = craft_bundle
        self.craft_strategy = craft_bundle.strategy
        self._craft_sft_loader = craft_sft_loader
        self._craft_contrastive_loader = craft_contrastive_loader
        self.craft_mixed_loader: CRAFTMixedDataLoader | None = None
        # compute_loss returns window-normalised losses: Trainer must not divide them by the accumulation steps.
        self.loss_is_scaled_for_ga = True
        base = unwrap_model(self.model)
        self.craft_modules = CRAFTModules(base.config.get_text_config().hidden_size, self.args).to(self.args.device)
        self.craft_queue = (NegativeQueue(self.args.craft_negative_queue_size)
                            if self.args.craft_negative_strategy == "queue" else None)
        self.craft_balancing = GradientBalancing(self.args.craft_gradient_balancing, self.args.craft_alpha,
                                                 seed=self.args.seed)
        if self.craft_balancing.module is not None:
            # uncertainty's log-variances: in the optimizer, all-reduced and saved along with the head
            self.craft_modules.add_module("balancing", self.craft_balancing.module.to(self.args.device))
        self._craft_step_losses: dict[int, float] = {}
        self.craft_ema = EMAReference(EMA_DECAY)
        self._craft_forward_names = set(inspect.signature(base.forward).parameters) | set(_LABEL_KEYS)
        self._craft_window: _WindowLog | None = None
        self._craft_scaler: AccumulationScaler | None = None
        self._craft_logs: dict[str, list[float]] = defaultdict(list)

    # ---------------------------------------------------------------------------------------------- data

    @property
    def craft_self_align(self) -> bool:
        return self.craft_strategy == "self_align"

    def _craft_collator(self):
        if self._craft_user_collator is not None:
            return self._craft_user_collator
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        pad_id = getattr(tokenizer, "pad_token_id", None)
        if pad_id is None:
            pad_id = unwrap_model(self.model).config.get_text_config().pad_token_id or 0
        return CRAFTCollator(pad_token_id=pad_id, assistant_mask_key=self.args.craft_assistant_mask_key,
                             add_labels=True)

    def _craft_build_loader(self, dataset, batch_size: int) -> DataLoader:
        args = self.args
        seed = args.data_seed if args.data_seed is not None else args.seed
        return build_loader(dataset, batch_size, self._craft_collator(), shuffle=True, seed=seed,
                            drop_last=args.dataloader_drop_last, num_replicas=args.world_size,
                            rank=args.process_index)

    def build_craft_mixed_loader(self) -> CRAFTMixedDataLoader:
        """The mixed SFT / contrastive micro-batch loader of one epoch (custom loaders take precedence).

        Self-align without a separate contrastive dataset or loader yields SFT micro-batches only (beta = 0):
        every one of them gives both losses from its single forward.
        """
        args = self.args
        sft_loader = self._craft_sft_loader or self._craft_build_loader(self.train_dataset,
                                                                         args.per_device_train_batch_size)
        bundle = self.craft_bundle
        if (self.craft_self_align and self._craft_contrastive_loader is None
                and bundle.contrastive_dataset is bundle.sft_dataset):
            return CRAFTMixedDataLoader(sft_loader, None, beta=0.0,
                                        gradient_accumulation_steps=args.gradient_accumulation_steps)
        contrastive_loader = self._craft_contrastive_loader or self._craft_build_loader(
            bundle.contrastive_dataset, args.craft_contrastive_batch_size or args.per_device_train_batch_size)
        return CRAFTMixedDataLoader(sft_loader, contrastive_loader, beta=args.craft_beta,
                                    gradient_accumulation_steps=args.gradient_accumulation_steps,
                                    length_strategy=args.craft_length_strategy, beta_mode=args.craft_beta_mode)

    def get_train_dataloader(self) -> DataLoader:
        self.craft_mixed_loader = self.build_craft_mixed_loader()
        return _MixedBatchLoader(self.craft_mixed_loader)

    # ------------------------------------------------------------------------------- accumulation window

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Fetch one accumulation window and set the exact-alpha weights for its micro-batches.

        Returns (batches, N_sft) with N_sft the window's SFT target tokens over all ranks; contrastive
        micro-batches never count as SFT tokens.
        """
        # Trainer zeroes only the model's gradients after a step; the CRAFT modules' are cleared here.
        self.craft_modules.zero_grad(set_to_none=True)
        batches = [_with_default_labels(batch, batch_type(batch))
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
        self._craft_window = _WindowLog(local, len(batches))
        return batches, torch.tensor(total.sft_tokens, device=device)

    def _craft_balanced_scaler(self, scaler: AccumulationScaler) -> BalancedScaler:
        """`scaler` with this step's balancing weights (`craft.gradient_balancing.BalancedScaler`)."""
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
        if not model.training:
            return super().compute_loss(model, self._craft_model_inputs(inputs), return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        if self._craft_scaler is None or self._craft_window is None or self._craft_window.remaining <= 0:
            # Called outside the Trainer loop (no window fetched): this micro-batch is its own window.
            [inputs], _ = self.get_batch_samples(iter([{**inputs, BATCH_TYPE_KEY: kind or SFT}]), 1,
                                                 self.args.device)
            kind = inputs.pop(BATCH_TYPE_KEY)
        self.craft_modules.train()
        inputs = _with_default_labels(inputs, kind)
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
            return self._craft_scaler.micro_batch_loss(sft_token_sum=token_sum, sft_tokens=num_tokens)
        anchor_mask, positive_mask = self._self_align_masks(inputs)
        with self._hidden_state_capture(model) as capture:
            token_sum = self._sft_token_sum(model, {**self._craft_model_inputs(inputs), **capture.forward_kwargs},
                                            num_tokens)
        contrastive, _, _ = self._pooled_infonce(capture.hidden, anchor_mask, positive_mask)
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

    def _craft_contrastive_micro_batch_loss(self, model, batch) -> torch.Tensor:
        """The weighted InfoNCE of one contrastive micro-batch, through GradCache when `craft_use_gradcache`."""
        if self.args.craft_use_gradcache:
            return contrastive_gradcache_loss(self, model, batch)
        loss, _, _ = self._contrastive_loss(model, batch)
        return self._craft_scaler.micro_batch_loss(contrastive_loss=loss)

    def _contrastive_loss(self, model, batch):
        """InfoNCE of one contrastive micro-batch: (loss, logits [B, B], anchor embeddings [B, D]).

        Paired: anchors and positives are right-padded to one length and run through `model` in one forward
        (only the last position's logits are computed). Self-align: one forward, prompt vs assistant pooling.
        """
        if self.craft_self_align:
            anchor_mask, positive_mask = self._self_align_masks(batch)
            hidden, zero = self._forward_hidden(model, batch["input_ids"], batch.get("attention_mask"))
            loss, logits, anchors = self._pooled_infonce(hidden, anchor_mask, positive_mask)
            return loss + zero, logits, anchors
        if "input_ids_tgt" not in batch:
            raise UserError("a paired contrastive batch has no 'input_ids_tgt' (the positives); the contrastive "
                            f"loader must yield them (CRAFTCollator pads them); batch keys: {', '.join(batch)}")
        anchors = _ids_and_mask(batch, "")
        positives = _ids_and_mask(batch, "_tgt")
        input_ids, attention_mask = _stack_right_padded([anchors, positives])
        hidden, zero = self._forward_hidden(model, input_ids, attention_mask)
        size = anchors[0].shape[0]
        embeddings = self.craft_modules.embed(hidden, attention_mask)
        loss, logits, anchor_embeddings = self._infonce(embeddings[:size], embeddings[size:])
        return loss + zero, logits, anchor_embeddings

    def _forward_hidden(self, model, input_ids, attention_mask):
        """(last hidden state [B, T, H], a zero tied to the logits) of one forward of the wrapped model.

        Only the last position's logits are computed. Adding the zero to the loss gives the LM head a (zero)
        gradient, as DDP requires of every parameter the forward used.
        """
        with self._hidden_state_capture(model) as capture:
            outputs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1,
                            **capture.forward_kwargs)
        return capture.hidden, outputs.logits.sum() * 0.0

    def _self_align_masks(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt mask, assistant mask), each [B, T]; a `UserError` naming rows with an empty span."""
        positive = assistant_token_mask(batch, self.args.craft_assistant_mask_key).bool()
        attention = batch.get("attention_mask")
        attention = torch.ones_like(positive) if attention is None else attention.bool()
        anchor = attention & ~positive
        empty = (~anchor.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise UserError(f"self_align: row(s) {', '.join(map(str, empty))} of the batch have no prompt token "
                            "(every token is an assistant token), so there is no anchor to pool")
        return anchor, positive

    def _pooled_infonce(self, hidden, anchor_mask, positive_mask):
        modules = self.craft_modules
        return self._infonce(modules.embed(hidden, anchor_mask), modules.embed(hidden, positive_mask))

    def _infonce(self, anchors, positives):
        """InfoNCE over projected embeddings, recorded for logging: (loss, logits, anchors).

        Every contrastive term of both strategies goes through here: the one place extra negatives plug in.
        """
        queue = self.craft_queue
        negatives = None if queue is None else queue.negatives()
        loss, logits = self.craft_modules.infonce(anchors, positives, negatives=negatives, return_logits=True)
        if queue is not None:
            queue.enqueue(positives)  # after the loss: detached copies, written out of place
        self._craft_record_contrastive(loss, logits, anchors)
        return loss, logits, anchors

    @contextlib.contextmanager
    def _hidden_state_capture(self, model):
        """Capture of the last hidden state around a forward of the (wrapped) model: `.hidden`, `.forward_kwargs`."""
        if self.args.craft_use_hidden_state_hook:
            capture = _FinalNormHook(unwrap_model(model))
        else:
            capture = _BackboneHiddenStates(model)
        with capture:
            yield capture

    # ------------------------------------------------------------------------------------------ logging

    def _craft_record_contrastive(self, loss, logits, anchors) -> None:
        self._craft_window.contrastive_sum += float(loss.detach())
        args = self.args
        if args.craft_metric_enabled("contrastive_accuracy"):
            self._craft_logs["metrics/craft_contrastive_accuracy"].append(contrastive_accuracy(logits))
        if args.craft_metric_enabled("representation_consistency"):
            value = self.craft_ema.representation_consistency(anchors)
            self._craft_logs["metrics/craft_representation_consistency"].append(value)
            self.craft_ema.update(anchors)
        if args.craft_learnable_temperature and args.craft_metric_enabled("temperature"):
            self._craft_logs["metrics/craft_temperature"].append(self.craft_modules.infonce.temperature)

    def _craft_end_micro_batch(self) -> None:
        window = self._craft_window
        window.remaining -= 1
        if window.remaining > 0:
            return
        alpha, total = self.args.craft_alpha, 0.0
        if window.counts.sft_tokens:
            sft = window.sft_nll_sum / window.counts.sft_tokens
            self._craft_logs["loss/craft_sft"].append(sft)
            total += alpha * sft
        if window.counts.contrastive_terms:
            contrast = window.contrastive_sum / window.counts.contrastive_terms
            self._craft_logs["loss/craft_contrast"].append(contrast)
            total += (1 - alpha) * contrast
        self._craft_logs["loss/craft_total"].append(total)
        self._craft_end_step_balancing(window)

    def _craft_end_step_balancing(self, window: _WindowLog) -> None:
        """Log the step's effective weights (alpha-weight x balancing weight); loss_scale and gradnorm get the
        step's task losses averaged over ranks."""
        balancing = self.craft_balancing
        for task, weight in balancing.effective_weights().items():
            self._craft_logs[f"balancing/craft_weight_{task}"].append(weight)
        if balancing.strategy not in ("loss_scale", "gradnorm"):
            return
        sums = torch.tensor([window.sft_nll_sum, window.counts.sft_tokens, window.contrastive_sum,
                             window.counts.contrastive_terms], dtype=torch.float64, device=self.args.device)
        if self.accelerator.num_processes > 1:
            torch.distributed.all_reduce(sums)
        sums = sums.tolist()
        self._craft_step_losses = {task: sums[2 * task] / sums[2 * task + 1]
                                   for task in (SFT_TASK, CONTRASTIVE_TASK) if sums[2 * task + 1] > 0}
        balancing.end_step(self._craft_step_losses)

    def log(self, logs, start_time=None):
        """Trainer logs plus the CRAFT terms averaged over the logging interval (training logs only)."""
        if "loss" in logs and self._craft_logs:
            logs.update({name: sum(values) / len(values) for name, values in self._craft_logs.items()})
            self._craft_logs.clear()
        return super().log(logs, start_time)

    # ------------------------------------------------------------------------------ optimizer and state

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.craft_balancing.per_task_gradients:
            return self._craft_per_task_training_step(model, inputs, num_items_in_batch)
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.num_processes > 1 and self._craft_step_complete():
            self._craft_all_reduce_gradients()
        return loss

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
        """The model's and the CRAFT modules' trainable parameters, in a fixed order (the same on every rank)."""
        return [p for p in itertools.chain(self.model.parameters(), self.craft_modules.parameters()) if p.requires_grad]

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

    def _craft_all_reduce_gradients(self) -> None:
        """Average the CRAFT modules' gradients over ranks, as DDP does for the model's (they are not in DDP)."""
        world = self.accelerator.num_processes
        for param in self.craft_modules.parameters():
            if param.grad is not None:
                torch.distributed.all_reduce(param.grad)
                param.grad /= world

    def create_optimizer(self, *args, **kwargs):
        """The host's optimizer plus the projection head and temperature (weight decay on the head's matrices)."""
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.accelerator.num_processes > 1:  # DDP broadcasts the model's initial weights, not these
            for tensor in self.craft_modules.state_dict().values():
                torch.distributed.broadcast(tensor, src=0)
        present = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [(name, p) for name, p in self.craft_modules.named_parameters()
                   if p.requires_grad and id(p) not in present]
        if not missing:
            return optimizer
        if self.lr_scheduler is not None:
            raise UserError("the optimizer passed in `optimizers=` does not hold the CRAFT projection head and "
                            "temperature; build it over model parameters + trainer.craft_modules.parameters()")
        decay = [p for name, p in missing if p.dim() >= 2]
        no_decay = [p for name, p in missing if p.dim() < 2]
        for params, weight_decay in ((decay, self.args.weight_decay), (no_decay, 0.0)):
            if params:
                optimizer.add_param_group({"params": params, "weight_decay": weight_decay})
        return optimizer

    def craft_state_dict(self) -> dict:
        """Projection head, InfoNCE (temperature) and EMA reference state."""
        modules = {k: v.detach().cpu() for k, v in self.craft_modules.state_dict().items()}
        state = {"modules": modules, "ema": self.craft_ema.state_dict(), "balancing": self.craft_balancing.state_dict()}
        if self.craft_queue is not None:
            state["queue"] = self.craft_queue.state_dict()
        return state

    def load_craft_state_dict(self, state: dict) -> None:
        self.craft_modules.load_state_dict(state["modules"])
        self.craft_ema.load_state_dict(state["ema"])
        if "balancing" in state:
            self.craft_balancing.load_state_dict(state["balancing"])
        if self.craft_queue is not None:
            if "queue" not in state:
                raise UserError("the checkpoint has no negative queue (it was trained without "
                                "craft_negative_strategy='queue'); resume with the same strategy")
            self.craft_queue.load_state_dict(state["queue"], device=self.args.device)

    def save_model(self, output_dir=None, _internal_call=False):
        """The host's save plus `craft_state.pt` next to the weights (also inside every checkpoint)."""
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            output_dir = self.args.output_dir if output_dir is None else output_dir
            os.makedirs(output_dir, exist_ok=True)
            torch.save(self.craft_state_dict(), os.path.join(output_dir, CRAFT_STATE_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, CRAFT_STATE_NAME)
        if not os.path.isfile(path):
            raise UserError(f"{resume_from_checkpoint} has no {CRAFT_STATE_NAME} (CRAFT projection head and "
                            "temperature): it was not written by a CRAFT trainer")
        self.load_craft_state_dict(torch.load(path, map_location=self.args.device, weights_only=True))


def _with_default_labels(batch, kind: str):
    """SFT batches without `labels` learn every non-padding token (labels = input_ids, padding -> -100)."""
    if kind == CONTRASTIVE or "labels" in batch:
        return batch
    labels = batch["input_ids"].clone()
    if "attention_mask" in batch:
        labels[batch["attention_mask"] == 0] = -100
    return {**batch, "labels": labels}


def _ids_and_mask(batch, suffix: str) -> tuple[torch.Tensor, torch.Tensor]:
    ids = batch["input_ids" + suffix]
    mask = batch.get("attention_mask" + suffix)
    return ids, torch.ones_like(ids) if mask is None else mask


def _stack_right_padded(pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate (ids [B_i, T_i], mask [B_i, T_i]) along the batch, right-padding to max T_i (mask 0 there).

    Causal attention and masked pooling make the extra right padding invisible to the real tokens.
    """
    length = max(ids.shape[1] for ids, _ in pairs)
    padded_ids, padded_masks = [], []
    for ids, mask in pairs:
        extra = length - ids.shape[1]
        padded_ids.append(nn.functional.pad(ids, (0, extra), value=0))  # any id: masked
        padded_masks.append(nn.functional.pad(mask, (0, extra), value=0))
    return torch.cat(padded_ids), torch.cat(padded_masks)


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
        super().__init__(model=model, args=args, train_dataset=train_dataset, data_collator=data_collator,
                         craft_bundle=craft_bundle, craft_sft_loader=craft_sft_loader,
                         craft_contrastive_loader=craft_contrastive_loader, **kwargs)


_TRL_WRAPPERS = ("CRAFTDPOTrainer", "CRAFTGRPOTrainer", "CRAFTKTOTrainer", "CRAFTRLOOTrainer", "CRAFTORPOTrainer",
                 "CRAFTPPOTrainer")


def __getattr__(name: str):
    """The preference / RL wrappers of `craft.trl_wrappers`, built on first import of their name."""
    if name in _TRL_WRAPPERS:
        from craft import trl_wrappers

        return getattr(trl_wrappers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
